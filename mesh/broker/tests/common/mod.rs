//! Helpers shared by the node tests that deploy plugins: a node on loopback in a directory,
//! a client that trusts its development CA, a component's bytes, reading a topic back.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use quiver_broker::{BrokerConfig, Node};
use quiver_client::{Client, ClientConfig, Consumer, ConsumerConfig, ConsumerRecord, SeekTo};

/// A node with its data in `dir`, on an ephemeral loopback port.
pub async fn start(dir: &Path) -> Node {
    Node::start(BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    })
    .await
    .expect("node starts")
}

/// A client of `node`.
pub async fn client(node: &Node) -> Client {
    let ca = node.ca_file().expect("dev CA").clone();
    Client::connect(ClientConfig::new(node.local_addr().to_string(), ca))
        .await
        .unwrap()
}

/// A built component's bytes.
pub fn wasm(path: &str) -> bytes::Bytes {
    std::fs::read(path).unwrap().into()
}

/// Every record of `topic`, from the earliest, up to the high watermarks seen.
pub async fn read_all(c: &Client, topic: &str) -> Vec<ConsumerRecord> {
    let mut consumer = Consumer::new(c.clone(), topic, None, ConsumerConfig::default())
        .await
        .unwrap();
    consumer.seek_all(SeekTo::Earliest).await.unwrap();
    let mut out = Vec::new();
    loop {
        out.extend(consumer.poll().await.unwrap());
        if consumer.caught_up() {
            return out;
        }
    }
}

/// Header `name` of `r` as text.
pub fn header(r: &ConsumerRecord, name: &str) -> Option<String> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
