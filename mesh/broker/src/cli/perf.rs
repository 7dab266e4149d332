//! `quiver perf`: the load generator. Every run can print one JSON summary line (`--json`) so
//! BENCHMARKS.md figures are reproducible from the command alone.
//!
//! - `produce`: K producers write N records (or for D seconds) and report acknowledged
//!   records/s, MB/s, failures and acknowledgement latency percentiles (sampled: every
//!   `--latency-sample`-th record; every record's outcome is counted).
//! - `consume`: reads N records from the earliest offset and reports records/s, MB/s and the
//!   latency of each poll (one fetch round trip and its decoding).
//! - `e2e`: a producer at `--rate` records/s and a consumer (own thread, runtime and
//!   connection) in one process; latency is from `send` to the record arriving at the consumer
//!   (send time travels in the value).
//! - `transport`: the raw QUIC stream ceiling to the same node with the same settings, both
//!   directions, through the `TransportProbe` API.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use std::collections::VecDeque;

use futures::FutureExt;
use quiver_client::{
    Acks, Client, Compression, Consumer, ConsumerConfig, DeliveryFuture, ProduceError, Producer,
    ProducerConfig, ProducerRecord, RecordMetadata, SeekTo,
};
use quiver_proto::ApiKey;
use quiver_proto::frame::frame_prefix;
use quiver_proto::messages::{
    Message, ProbeDirection, TransportProbeRequest, TransportProbeResponse,
};
use serde_json::json;

use super::ConnectArgs;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum PerfCommand {
    /// Produce throughput and acknowledgement latency.
    Produce(ProduceArgs),
    /// Consume throughput from the earliest offset.
    Consume(ConsumeArgs),
    /// End-to-end latency at a fixed rate.
    E2e(E2eArgs),
    /// Raw QUIC stream throughput to the node (the ceiling).
    Transport(TransportArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum KeyDistribution {
    /// No keys (sticky partitioning).
    None,
    /// Keys drawn uniformly from `--key-space` values.
    Random,
    /// Keys 0, 1, 2, ... modulo `--key-space`.
    Sequential,
}

#[derive(Debug, Args, Clone)]
struct Common {
    /// Topic to use (created if missing).
    #[arg(long, default_value = "perf")]
    topic: String,
    /// Partitions when creating the topic.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Topic flush policy when creating it: batch or interval.
    #[arg(long, default_value = "interval")]
    flush: String,
    /// Print one JSON summary line.
    #[arg(long)]
    json: bool,
    /// Initial QUIC packet size (raise on loopback/jumbo paths; max 6500).
    #[arg(long, default_value_t = 1200)]
    initial_mtu: u16,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args, Clone)]
struct ProducerArgs {
    /// Value size, bytes.
    #[arg(long, default_value_t = 100)]
    record_bytes: usize,
    /// Records in total (across producers).
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Run for this long instead of --count.
    #[arg(long)]
    duration_s: Option<u64>,
    /// Key choice.
    #[arg(long, value_enum, default_value = "none")]
    keys: KeyDistribution,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Acknowledgement: none, leader or all.
    #[arg(long, default_value = "leader")]
    acks: Acks,
    /// Compression: none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: Compression,
    /// Producer batch size, bytes.
    #[arg(long, default_value_t = 256 << 10)]
    batch_bytes: usize,
    /// Producer linger, ms.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Produce requests in flight per producer.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Producers, each with its own connection.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Time one in this many records' acknowledgement.
    #[arg(long, default_value_t = 64)]
    latency_sample: u64,
    /// Values: random bytes, or JSON log lines padded to --record-bytes
    /// (`{"seq":N,"level":"error|warn|info|debug","user":"uN","pad":"..."}`, levels in turn),
    /// for benchmarks with JSON plugins.
    #[arg(long, value_enum, default_value = "random")]
    values: ValueKind,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ValueKind {
    Random,
    Json,
}

/// A JSON log line for record `seq`, padded to `bytes` when it is shorter.
fn json_value(seq: u64, bytes: usize) -> Bytes {
    const LEVELS: [&str; 4] = ["error", "warn", "info", "debug"];
    let level = LEVELS[(seq % 4) as usize];
    let head = format!(
        r#"{{"seq":{seq},"level":"{level}","user":"u{}","pad":""#,
        seq % 10_000
    );
    let pad = bytes.saturating_sub(head.len() + 2);
    let mut v = Vec::with_capacity(head.len() + pad + 2);
    v.extend_from_slice(head.as_bytes());
    v.resize(head.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    Bytes::from(v)
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    producer: ProducerArgs,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    common: Common,
    /// Records to read.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Fetch size, bytes.
    #[arg(long, default_value_t = 16 << 20)]
    fetch_bytes: u32,
    /// Run this deployed plugin on the node over the records (consumer-side filtering);
    /// repeat for a chain. Throughput then counts the offsets the consumer moved past.
    #[arg(long = "plugin", value_name = "NAME[@VERSION]")]
    plugins: Vec<String>,
    /// Plugin parameter KEY=VALUE (NAME.KEY=VALUE with several plugins).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
}

#[derive(Debug, Args)]
pub struct E2eArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    producer: ProducerArgs,
    /// Records per second to produce (0: as fast as possible).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
}

#[derive(Debug, Args)]
pub struct TransportArgs {
    #[command(flatten)]
    common: Common,
    /// Bytes per direction.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Concurrent streams.
    #[arg(long, default_value_t = 1)]
    streams: usize,
}

/// Runs a benchmark.
pub async fn run(cmd: PerfCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PerfCommand::Produce(a) => produce(a).await?,
        PerfCommand::Consume(a) => consume(a).await?,
        PerfCommand::E2e(a) => e2e(a).await?,
        PerfCommand::Transport(a) => transport(a).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(c: &Common) -> anyhow::Result<Client> {
    let mut cfg = c.connect.client_config();
    cfg.transport.initial_mtu = c.initial_mtu;
    if !c.connect.ca.exists() {
        anyhow::bail!("CA file {} not found; pass --ca", c.connect.ca.display());
    }
    Ok(Client::connect(cfg).await?)
}

async fn ensure_topic(client: &Client, c: &Common) -> anyhow::Result<()> {
    if client.partition_count(&c.topic).await.is_ok() {
        return Ok(());
    }
    let configs = vec![("flush.policy".to_string(), c.flush.clone())];
    match client.create_topic(&c.topic, c.partitions, &configs).await {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(quiver_proto::ErrorCode::TopicAlreadyExists) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// xorshift64*: fast, seeded, good enough for payloads and key choice.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn payload_pool(bytes: usize) -> Bytes {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut v = Vec::with_capacity(bytes + 8);
    while v.len() < bytes {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(bytes);
    Bytes::from(v)
}

fn histogram() -> Histogram<u64> {
    // Auto-resizing, 3 significant digits: construction only fails for sigfig > 5.
    #[allow(clippy::unwrap_used)]
    Histogram::new(3).unwrap()
}

fn quantiles_ms(h: &Histogram<u64>) -> serde_json::Value {
    let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
    json!({"p50_ms": q(0.50), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": h.max() as f64 / 1000.0, "samples": h.len()})
}

fn producer_config(p: &ProducerArgs) -> ProducerConfig {
    ProducerConfig {
        acks: p.acks,
        compression: p.compression,
        batch_bytes: p.batch_bytes,
        linger_ms: p.linger_ms,
        in_flight_max: p.in_flight,
        ..ProducerConfig::default()
    }
}

struct ProduceOutcome {
    records: u64,
    failed: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

/// Drives `producers` producers until `count` records (or `duration`) are acknowledged. With
/// `rate > 0` records are paced; with `stamp` each value starts with the send time (µs since
/// `origin`).
async fn drive_producers(
    common: &Common,
    p: &ProducerArgs,
    rate: u64,
    stamp: Option<Instant>,
) -> anyhow::Result<ProduceOutcome> {
    let pool = payload_pool((p.record_bytes * 64).max(1 << 20));
    let n = p.producers.max(1);
    let deadline = p
        .duration_s
        .map(|s| Instant::now() + Duration::from_secs(s));
    let per_producer = p.count.div_ceil(n as u64);
    let started = Instant::now();
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let client = connect(common).await?;
        let producer = Producer::new(client, producer_config(p));
        let (pool, p, topic, failed) = (
            pool.clone(),
            p.clone(),
            common.topic.clone(),
            failed.clone(),
        );
        let rate_each = rate / n as u64;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x1234_5678 + i as u64);
            let mut hist = histogram();
            let mut sampled = Vec::new();
            // Every other record's outcome, oldest first; settled ones are drained as the run
            // goes (the producer's buffer bounds how many can be unsettled), so the summary
            // counts acknowledged records and every failure, not records handed to `send`.
            let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
            let (mut acked, mut lost) = (0u64, 0u64);
            let mut settle = |r: Result<RecordMetadata, ProduceError>| match r {
                Ok(_) => acked += 1,
                Err(_) => lost += 1,
            };
            let mut sent = 0u64;
            let t0 = Instant::now();
            while deadline.map_or(sent < per_producer, |d| Instant::now() < d) {
                if rate_each > 0 {
                    let due = t0 + Duration::from_secs_f64(sent as f64 / rate_each as f64);
                    let now = Instant::now();
                    if due > now {
                        tokio::time::sleep(due - now).await;
                    }
                }
                let off = (rng.next() as usize) % (pool.len() - p.record_bytes.min(pool.len()) + 1);
                let value = match stamp {
                    _ if matches!(p.values, ValueKind::Json) => {
                        json_value(i as u64 * per_producer + sent, p.record_bytes)
                    }
                    Some(origin) if p.record_bytes >= 8 => {
                        let mut v = pool.slice(off..off + p.record_bytes).to_vec();
                        let us = origin.elapsed().as_micros() as u64;
                        v[..8].copy_from_slice(&us.to_le_bytes());
                        Bytes::from(v)
                    }
                    _ => pool.slice(off..off + p.record_bytes.min(pool.len())),
                };
                let key = match p.keys {
                    KeyDistribution::None => None,
                    KeyDistribution::Random => {
                        Some(Bytes::from((rng.next() % p.key_space.max(1)).to_string()))
                    }
                    KeyDistribution::Sequential => {
                        Some(Bytes::from((sent % p.key_space.max(1)).to_string()))
                    }
                };
                let record = ProducerRecord {
                    topic: topic.clone(),
                    key,
                    value: Some(value),
                    ..ProducerRecord::default()
                };
                let at = Instant::now();
                match producer.send(record).await {
                    Ok(d) => {
                        if sent.is_multiple_of(p.latency_sample.max(1)) {
                            sampled.push((
                                at,
                                tokio::spawn(async move {
                                    let r = d.await;
                                    (r.is_ok(), Instant::now())
                                }),
                            ));
                        } else {
                            pending.push_back(d);
                        }
                        if sent.is_multiple_of(1024) {
                            while let Some(r) = pending.front_mut().and_then(|f| f.now_or_never()) {
                                pending.pop_front();
                                settle(r);
                            }
                        }
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "send failed");
                    }
                }
                sent += 1;
            }
            if let Err(e) = producer.close().await {
                tracing::warn!(error = %e, "producer close failed");
            }
            // Everything is settled once `close` returns: the run ends here.
            let done_at = Instant::now();
            for d in pending {
                settle(d.await);
            }
            for (at, h) in sampled {
                match h.await {
                    Ok((true, done)) => {
                        acked += 1;
                        let _ = hist.record((done - at).as_micros().max(1) as u64);
                    }
                    _ => lost += 1,
                }
            }
            failed.fetch_add(lost, Ordering::Relaxed);
            (acked, hist, done_at)
        }));
    }
    let mut records = 0;
    let mut latency = histogram();
    let mut ended = started;
    for t in tasks {
        let (acked, h, done_at) = t.await?;
        records += acked;
        ended = ended.max(done_at);
        latency.add(&h).ok();
    }
    Ok(ProduceOutcome {
        records,
        failed: failed.load(Ordering::Relaxed),
        elapsed: ended - started,
        latency,
    })
}

fn report(kind: &str, json_out: bool, summary: serde_json::Value) {
    if json_out {
        println!("{summary}");
    } else {
        println!("perf {kind}:");
        if let Some(obj) = summary.as_object() {
            for (k, v) in obj {
                println!("  {k}: {v}");
            }
        }
    }
}

async fn produce(a: ProduceArgs) -> anyhow::Result<()> {
    let client = connect(&a.common).await?;
    ensure_topic(&client, &a.common).await?;
    let out = drive_producers(&a.common, &a.producer, 0, None).await?;
    let secs = out.elapsed.as_secs_f64();
    let mb = (out.records as f64 * a.producer.record_bytes as f64) / 1e6;
    report(
        "produce",
        a.common.json,
        json!({
            "kind": "produce",
            "records": out.records,
            "failed": out.failed,
            "record_bytes": a.producer.record_bytes,
            "producers": a.producer.producers,
            "acks": format!("{:?}", a.producer.acks).to_lowercase(),
            "compression": a.producer.compression.to_string(),
            "flush": a.common.flush,
            "seconds": secs,
            "records_per_s": out.records as f64 / secs,
            "mb_per_s": mb / secs,
            "ack_latency": quantiles_ms(&out.latency),
        }),
    );
    if out.failed > 0 {
        anyhow::bail!("{} record(s) failed", out.failed);
    }
    Ok(())
}

async fn consume(a: ConsumeArgs) -> anyhow::Result<()> {
    let chain = super::plugin_cmds::chain_from_flags(&a.plugins, &a.params)?;
    let filtered = !chain.is_empty();
    let client = connect(&a.common).await?;
    let mut consumer = Consumer::new(
        client.clone(),
        &a.common.topic,
        None,
        ConsumerConfig {
            fetch_bytes_max: a.fetch_bytes,
            partition_bytes_max: a.fetch_bytes,
            chain,
            ..ConsumerConfig::default()
        },
    )
    .await?;
    consumer.seek_all(SeekTo::Earliest).await?;
    let starts: Vec<(u32, u64)> = consumer
        .assignment()
        .into_iter()
        .map(|p| (p, consumer.position(p).unwrap_or(0)))
        .collect();
    // Offsets moved past: with a chain, records dropped on the node count as read.
    let scanned = |c: &Consumer| -> u64 {
        starts
            .iter()
            .map(|(p, s)| c.position(*p).unwrap_or(*s).saturating_sub(*s))
            .sum()
    };
    let started = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut idle_polls = 0;
    // Time of each poll (one fetch round trip, decoding included).
    let mut fetch_latency = histogram();
    while (if filtered {
        scanned(&consumer)
    } else {
        records
    }) < a.count
    {
        let at = Instant::now();
        let batch = consumer.poll().await?;
        let _ = fetch_latency.record(at.elapsed().as_micros().max(1) as u64);
        if batch.is_empty() {
            idle_polls += 1;
            if idle_polls >= 4 && consumer.caught_up() {
                tracing::warn!(records, "topic exhausted before --count");
                break;
            }
            continue;
        }
        idle_polls = 0;
        records += batch.len() as u64;
        bytes += batch
            .iter()
            .map(|r| r.value.as_ref().map_or(0, |v| v.len()) as u64)
            .sum::<u64>();
    }
    let secs = started.elapsed().as_secs_f64();
    // Let the node release this connection's chains at once.
    client.close().await;
    let read = if filtered {
        scanned(&consumer)
    } else {
        records
    };
    report(
        "consume",
        a.common.json,
        json!({
            "kind": "consume",
            "records": read,
            "delivered": records,
            "chain": a.plugins,
            "seconds": secs,
            "records_per_s": read as f64 / secs,
            "mb_per_s": bytes as f64 / 1e6 / secs,
            "poll_latency": quantiles_ms(&fetch_latency),
        }),
    );
    Ok(())
}

async fn e2e(a: E2eArgs) -> anyhow::Result<()> {
    if matches!(a.producer.values, ValueKind::Json) {
        anyhow::bail!("--values json is for perf produce; e2e stamps the send time in the value");
    }
    if a.producer.record_bytes < 8 {
        anyhow::bail!(
            "--record-bytes must be at least 8 for e2e (the send time travels in the value)"
        );
    }
    let client = connect(&a.common).await?;
    ensure_topic(&client, &a.common).await?;
    let origin = Instant::now();
    let expected = a.producer.count;
    // The consumer gets its own thread, runtime and connection, as a separate consumer
    // process would: sharing the producer's runtime would measure scheduling between the two.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let common = a.common.clone();
    let consumer_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let client = connect(&common).await?;
            let mut consumer = Consumer::new(
                client,
                &common.topic,
                None,
                ConsumerConfig {
                    fetch_wait_ms_max: 100,
                    ..ConsumerConfig::default()
                },
            )
            .await?;
            consumer.seek_all(SeekTo::Latest).await?;
            let _ = ready_tx.send(());
            let mut hist = histogram();
            let mut seen = 0u64;
            let give_up = Duration::from_secs(10);
            let mut last = Instant::now();
            while seen < expected && last.elapsed() < give_up {
                let batch = consumer.poll().await?;
                if !batch.is_empty() {
                    last = Instant::now();
                }
                let now_us = origin.elapsed().as_micros() as u64;
                for r in &batch {
                    if let Some(v) = r.value.as_ref().filter(|v| v.len() >= 8) {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&v[..8]);
                        let sent = u64::from_le_bytes(b);
                        let _ = hist.record(now_us.saturating_sub(sent).max(1));
                    }
                }
                seen += batch.len() as u64;
            }
            Ok::<_, anyhow::Error>((seen, hist))
        })
    });
    ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("the consumer failed to start"))?;
    let out = drive_producers(&a.common, &a.producer, a.rate, Some(origin)).await?;
    let (seen, hist) = tokio::task::spawn_blocking(move || consumer_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the consumer thread panicked"))??;
    let secs = out.elapsed.as_secs_f64();
    report(
        "e2e",
        a.common.json,
        json!({
            "kind": "e2e",
            "records": out.records,
            "consumed": seen,
            "target_rate": a.rate,
            "records_per_s": out.records as f64 / secs,
            "record_bytes": a.producer.record_bytes,
            "e2e_latency": quantiles_ms(&hist),
            "ack_latency": quantiles_ms(&out.latency),
        }),
    );
    Ok(())
}

async fn probe_once(client: &Client, direction: ProbeDirection, bytes: u64) -> anyhow::Result<u64> {
    let (mut send, mut recv) = client.open_raw().await?;
    let body = TransportProbeRequest { direction, bytes }.to_bytes();
    let mut head = [
        frame_prefix(ApiKey::TransportProbe.code(), 1, 0, body.len()),
        body,
    ];
    send.write_chunks(&mut head).await?;
    match direction {
        ProbeDirection::Upload => {
            let block = Bytes::from(vec![0xa5u8; 256 << 10]);
            let mut left = bytes;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                let mut c = [block.slice(..n)];
                send.write_chunks(&mut c).await?;
                left -= n as u64;
            }
            send.finish()?;
            let frame = recv.read_to_end(1 << 10).await?;
            let (header, body) = quiver_proto::ResponseHeader::decode(frame)?;
            if header.error != 0 {
                anyhow::bail!("probe refused: error {}", header.error);
            }
            let received = TransportProbeResponse::from_bytes(body)?.bytes;
            if received != bytes {
                anyhow::bail!("server received {received} of {bytes} bytes");
            }
            Ok(received)
        }
        ProbeDirection::Download => {
            send.finish()?;
            let mut got = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX).await? {
                got += chunk.len() as u64;
            }
            // The first 24 bytes are the response frame.
            Ok(got.saturating_sub(24))
        }
    }
}

async fn transport(a: TransportArgs) -> anyhow::Result<()> {
    let client = connect(&a.common).await?;
    let streams = a.streams.max(1);
    let per_stream = a.bytes / streams as u64;
    let mut results = serde_json::Map::new();
    for (name, dir) in [
        ("upload", ProbeDirection::Upload),
        ("download", ProbeDirection::Download),
    ] {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..streams {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                probe_once(&client, dir, per_stream).await
            }));
        }
        let mut total = 0u64;
        for t in tasks {
            total += t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        results.insert(
            name.to_string(),
            json!({"bytes": total, "seconds": secs, "mb_per_s": total as f64 / 1e6 / secs}),
        );
    }
    results.insert("kind".into(), json!("transport"));
    results.insert("streams".into(), json!(streams));
    results.insert("initial_mtu".into(), json!(a.common.initial_mtu));
    report(
        "transport",
        a.common.json,
        serde_json::Value::Object(results),
    );
    Ok(())
}
