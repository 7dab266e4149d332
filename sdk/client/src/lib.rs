//! The Quiver client: a QUIC connection to a node, with
//!
//! - [`Client`]: requests and topic administration ([`Client::create_topic`], ...);
//! - [`Producer`]: batching (linger, batch bytes), compression, key-hash partitioning (sticky
//!   for keyless records), pipelined requests, a future per record;
//! - [`Consumer`]: partition assignment, seeking by offset or time, records as a stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use quiver_client::*;
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7400", "quiver-data/tls/ca.pem")).await?;
//! client.create_topic("events", 3, &[]).await?;
//! let producer = Producer::new(client.clone(), ProducerConfig::default());
//! let delivery = producer.send(ProducerRecord::new("events", "hello").key("k1")).await?;
//! let meta = delivery.await?;
//! println!("stored at {}/{:?}", meta.partition, meta.offset);
//! let mut consumer = Consumer::new(client, "events", None, ConsumerConfig::default()).await?;
//! consumer.seek_all(SeekTo::Earliest).await?;
//! for r in consumer.poll().await? {
//!     println!("{} {:?}", r.offset, r.value);
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod client;
mod consumer;
mod partitioner;
mod producer;

pub use client::{Client, ClientConfig, ClientError};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, SeekTo};
pub use partitioner::murmur2;
pub use producer::{
    DeliveryFuture, ProduceError, Producer, ProducerConfig, ProducerRecord, RecordMetadata,
};
pub use quiver_proto::messages::{Acks, ChainStep};
pub use quiver_proto::{Compression, ErrorCode};
pub use quiver_transport::TransportSettings;
