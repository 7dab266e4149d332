//! Hostile or broken input on the peer endpoint (`quiver-peer/1`) from a node that holds a
//! certificate of the cluster CA: every bad frame gets its own clear error, and the node goes
//! on serving peers and clients.
//!
//! How and why: one node in cluster mode (a single controller voter, so it forms a cluster on
//! its own) in a temporary directory; the test dials its peer endpoint as a fellow node would,
//! with a certificate issued by the same development CA, and sends raw frames.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use quiver_broker::{BrokerConfig, Node};
use quiver_client::{Client, ClientConfig};
use quiver_proto::codec::Writer;
use quiver_proto::peer::{BrokerHeartbeat, PeerApi, ReplicaFetchRequest};
use quiver_proto::{ErrorCode, RequestHeader, ResponseHeader};
use quiver_transport::{ClientTrust, Connection, ServerIdentity, TransportSettings};

async fn exchange(conn: &Connection, frame: &[u8]) -> ErrorCode {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(frame).await.unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(1 << 20).await.unwrap();
    let (header, _) = ResponseHeader::decode(answer).unwrap();
    ErrorCode::from_code(header.error)
}

/// The next answer frame on a stream, or `None` at its end.
async fn next_answer(recv: &mut quiver_transport::RecvStream) -> Option<ErrorCode> {
    let mut prefix = [0u8; 4];
    let first = recv.read_chunk(4).await.unwrap()?;
    prefix[..first.len()].copy_from_slice(&first);
    recv.read_exact(&mut prefix[first.len()..]).await.unwrap();
    let rest = recv
        .read_exact_bytes(u32::from_le_bytes(prefix) as usize)
        .await
        .unwrap();
    let mut whole = BytesMut::new();
    whole.put_slice(&prefix);
    whole.put_slice(&rest);
    let (header, _) = ResponseHeader::decode(whole.freeze()).unwrap();
    Some(ErrorCode::from_code(header.error))
}

fn frame(api: u16, body: &[u8]) -> Vec<u8> {
    RequestHeader {
        api,
        version: 1,
        request_id: 7,
    }
    .encode(body)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_frames_get_clear_errors_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let mut config = BrokerConfig {
        data_dir: dir.path().join("node"),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    };
    config.cluster.controller_voters = vec![1];
    config.cluster.dev_ca_dir = Some(ca_dir.clone());
    config.cluster.peer_listen = Some("127.0.0.1:0".parse().unwrap());
    let node = Node::start(config).await.unwrap();
    let cluster = node.cluster().unwrap().clone();
    assert!(
        cluster.wait_registered(Duration::from_secs(30)).await,
        "the node registered with its own controller"
    );
    let epoch = cluster.broker_epoch().unwrap();

    // A fellow node: its own certificate from the same CA.
    let (identity, ca) =
        ServerIdentity::load_or_generate_dev_with_ca(&dir.path().join("peer"), &ca_dir, &[])
            .unwrap();
    let trust = ClientTrust::from_ca_file(&ca).unwrap();
    let endpoint =
        quiver_transport::Client::new_peer(&trust, &identity, &TransportSettings::default())
            .unwrap();
    let conn = endpoint.connect(cluster.peer_addr(), None).await.unwrap();

    assert_eq!(
        exchange(&conn, &frame(999, b"")).await,
        ErrorCode::UnsupportedApi
    );
    for api in [
        PeerApi::RaftVote,
        PeerApi::RaftAppend,
        PeerApi::RaftSnapshot,
    ] {
        assert_eq!(
            exchange(&conn, &frame(api.code(), b"{not json")).await,
            ErrorCode::InvalidRequest,
            "{api:?} with a body that is not JSON"
        );
    }
    assert_eq!(
        exchange(
            &conn,
            &frame(PeerApi::ControllerWrite.code(), br#"{"Explode":{}}"#)
        )
        .await,
        ErrorCode::InvalidRequest,
        "a command that does not exist"
    );
    // Hello with a byte too many; ReplicaFetch cut short.
    let mut w = Writer::new();
    quiver_proto::peer::Hello {
        node_id: 9,
        peer_addr: "x".into(),
        client_addr: "y".into(),
        controller: 0,
    }
    .encode(&mut w);
    let mut hello = w.into_bytes().to_vec();
    hello.push(0);
    assert_eq!(
        exchange(&conn, &frame(PeerApi::Hello.code(), &hello)).await,
        ErrorCode::InvalidRequest
    );
    let mut w = Writer::new();
    let fetch = ReplicaFetchRequest {
        topic: "nowhere".into(),
        partition: 0,
        replica: 1,
        broker_epoch: epoch,
        leader_epoch: 1,
        fetch_offset: 0,
        last_fetched_epoch: None,
        durable_end: 0,
        max_bytes: 1 << 20,
        wait_ms: 0,
    };
    fetch.encode(&mut w);
    let whole = w.into_bytes();
    assert_eq!(
        exchange(
            &conn,
            &frame(PeerApi::ReplicaFetch.code(), &whole[..whole.len() - 3])
        )
        .await,
        ErrorCode::InvalidRequest
    );
    // Well formed but wrong: a partition this node holds no replica of; a heartbeat of a
    // replaced incarnation.
    assert_eq!(
        exchange(&conn, &frame(PeerApi::ReplicaFetch.code(), &whole)).await,
        ErrorCode::NotLeader
    );
    // A replica fetch stream carries a series of fetches, each answered in turn while the
    // stream stays open; another API on it is refused and ends it, as does a cut frame.
    for (tail, last) in [
        (
            frame(PeerApi::Hello.code(), &hello),
            ErrorCode::InvalidRequest,
        ),
        (
            frame(PeerApi::ReplicaFetch.code(), &whole)[..9].to_vec(),
            ErrorCode::InvalidRequest,
        ),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        for _ in 0..3 {
            send.write_all(&frame(PeerApi::ReplicaFetch.code(), &whole))
                .await
                .unwrap();
            assert_eq!(next_answer(&mut recv).await, Some(ErrorCode::NotLeader));
        }
        send.write_all(&tail).await.unwrap();
        send.finish().unwrap();
        assert_eq!(next_answer(&mut recv).await, Some(last));
        assert_eq!(next_answer(&mut recv).await, None, "the stream ends there");
    }
    // Finishing between two fetches ends the stream quietly.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame(PeerApi::ReplicaFetch.code(), &whole))
        .await
        .unwrap();
    assert_eq!(next_answer(&mut recv).await, Some(ErrorCode::NotLeader));
    send.finish().unwrap();
    assert_eq!(next_answer(&mut recv).await, None);
    let mut w = Writer::new();
    BrokerHeartbeat {
        node_id: 1,
        broker_epoch: epoch + 100,
    }
    .encode(&mut w);
    assert_eq!(
        exchange(
            &conn,
            &frame(PeerApi::BrokerHeartbeat.code(), &w.into_bytes())
        )
        .await,
        ErrorCode::StaleBrokerEpoch
    );
    // A length prefix far past the peer frame limit.
    let mut huge = BytesMut::new();
    huge.put_u32_le(u32::MAX);
    huge.put_slice(&[0u8; 12]);
    assert_eq!(exchange(&conn, &huge).await, ErrorCode::InvalidRequest);

    // Still serving: clients and the controller.
    let client = Client::connect(ClientConfig::new(
        node.local_addr().to_string(),
        node.ca_file().unwrap().clone(),
    ))
    .await
    .unwrap();
    let status = client.cluster_status().await.unwrap();
    assert!(status.status.is_ok());
    assert_eq!(status.controller, 1);
    client
        .create_topic("after-bad-input", 1, &[])
        .await
        .unwrap();
    node.shutdown().await;
}
