//! `quiver topic`, `quiver produce`, `quiver consume`.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use quiver_client::{
    Acks, Compression, Consumer, ConsumerConfig, ConsumerRecord, Producer, ProducerConfig,
    ProducerRecord, SeekTo,
};
use quiver_proto::messages::config_keys as keys;
use quiver_proto::messages::{GossipStatus, MemberState, RaftRole};

use super::ConnectArgs;

/// Cluster inspection.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, the active controller and partition leadership, as the node asked sees them.
    Status(ClusterStatusArgs),
}

#[derive(Debug, Args)]
pub struct ClusterStatusArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Runs a `cluster` subcommand.
pub async fn cluster(cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ClusterCommand::Status(a) => {
            let client = a.connect.connect().await?;
            let s = client.cluster_status().await?;
            let role = |r: RaftRole| match r {
                RaftRole::Voter => "voter",
                RaftRole::Learner => "learner",
                RaftRole::None => "-",
            };
            let state = |m: MemberState| match m {
                MemberState::Live => "live",
                MemberState::Fenced => "fenced",
                MemberState::Unregistered => "unregistered",
            };
            let gossip = |g: GossipStatus| match g {
                GossipStatus::Alive => "alive",
                GossipStatus::Suspect => "suspect",
                GossipStatus::Down => "down",
                GossipStatus::Unknown => "-",
            };
            let ids = |v: &[u32]| {
                v.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            if a.json {
                let members: Vec<serde_json::Value> = s
                    .members
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "node": m.node_id, "addr": m.addr, "peer_addr": m.peer_addr,
                            "role": role(m.role), "state": state(m.state),
                            "broker_epoch": m.broker_epoch, "gossip": gossip(m.gossip),
                        })
                    })
                    .collect();
                let partitions: Vec<serde_json::Value> = s
                    .partitions
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "topic": p.topic, "partition": p.partition, "leader": p.leader,
                            "leader_epoch": p.leader_epoch, "replicas": p.replicas, "isr": p.isr,
                            "adding": p.adding, "removing": p.removing,
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "cluster": s.status.is_ok(), "node": s.node_id,
                    "controller": s.controller, "term": s.term, "applied": s.applied,
                    "members": members, "partitions": partitions,
                });
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            if !s.status.is_ok() {
                println!("node {} runs alone (not in a cluster)", s.node_id);
            } else {
                let controller = match s.controller {
                    0 => "none".to_string(),
                    c => c.to_string(),
                };
                println!(
                    "node {} sees: controller {controller}, term {}, metadata applied to {}",
                    s.node_id, s.term, s.applied
                );
            }
            println!(
                "{:<6} {:<8} {:<13} {:<6} {:<22} {:<22} GOSSIP",
                "NODE", "ROLE", "STATE", "EPOCH", "ADDR", "PEER"
            );
            for m in &s.members {
                println!(
                    "{:<6} {:<8} {:<13} {:<6} {:<22} {:<22} {}",
                    m.node_id,
                    role(m.role),
                    state(m.state),
                    m.broker_epoch,
                    m.addr,
                    m.peer_addr,
                    gossip(m.gossip)
                );
            }
            if !s.partitions.is_empty() {
                println!();
                println!(
                    "{:<24} {:<9} {:<7} {:<6} {:<12} {:<12} MOVING",
                    "TOPIC", "PARTITION", "LEADER", "EPOCH", "REPLICAS", "ISR"
                );
                for p in &s.partitions {
                    let leader = match p.leader {
                        0 => "none".to_string(),
                        l => l.to_string(),
                    };
                    let moving = if p.adding.is_empty() && p.removing.is_empty() {
                        "-".to_string()
                    } else {
                        format!("+{} -{}", ids(&p.adding), ids(&p.removing))
                    };
                    println!(
                        "{:<24} {:<9} {:<7} {:<6} {:<12} {:<12} {moving}",
                        p.topic,
                        p.partition,
                        leader,
                        p.leader_epoch,
                        ids(&p.replicas),
                        ids(&p.isr)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Topic administration.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topics.
    List(ListArgs),
    /// Show a topic's settings and partition offsets.
    Describe(NameArgs),
    /// Change a live topic's plugin policy.
    Alter(AlterArgs),
    /// Delete a topic and its data.
    Delete(NameArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// Topic name.
    name: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Topic name: letters, digits, '.', '_' and '-'.
    name: String,
    /// Number of partitions.
    #[arg(long, short = 'p', default_value_t = 1)]
    partitions: u32,
    /// Delete segments older than this (ms; -1 keeps forever).
    #[arg(long, allow_hyphen_values = true)]
    retention_ms: Option<i64>,
    /// Delete oldest segments while the partition is larger than this (bytes; -1 unlimited).
    #[arg(long, allow_hyphen_values = true)]
    retention_bytes: Option<i64>,
    /// Roll segments at this size (bytes).
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Roll segments at this age (ms).
    #[arg(long)]
    segment_ms: Option<i64>,
    /// fsync before acknowledging each produce (batch) or on an interval.
    #[arg(long, value_enum)]
    flush: Option<FlushArg>,
    /// With --flush interval: fsync at least this often (ms).
    #[arg(long)]
    flush_interval_ms: Option<u64>,
    /// Largest record accepted (bytes).
    #[arg(long)]
    max_record_bytes: Option<u64>,
    /// Replicas per partition (cluster mode; a node alone takes only 1).
    #[arg(long, short = 'r')]
    replication_factor: Option<u16>,
    /// Produces with acks=all need at least this many in-sync replicas.
    #[arg(long)]
    min_insync_replicas: Option<u16>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Any topic setting as KEY=VALUE (repeatable).
    #[arg(long = "config", value_parser = parse_kv)]
    configs: Vec<(String, String)>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// A topic's produce-side plugin policy.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Plugins every produced batch runs through before it is stored, as one string: steps
    /// separated by '|', each NAME[@VERSION] then KEY=VALUE parameters, e.g.
    /// 'redact fields=ssn | filter-json field=level op=ne value=debug'.
    #[arg(long, value_name = "CHAIN")]
    on_produce: Option<String>,
    /// What happens to records the chain fails: fail (refuse the produce, naming the record),
    /// skip (drop them) or dlq:TOPIC (store them, unchanged, in TOPIC with headers naming the
    /// plugin, the error and the source).
    #[arg(long, value_name = "fail|skip|dlq:TOPIC")]
    on_error: Option<String>,
}

impl PolicyArgs {
    /// The settings to send; the chain is checked here so a typo fails before the request.
    fn configs(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        if let Some(c) = &self.on_produce {
            let chain = crate::topic_config::check_chain_text(c)
                .map_err(|e| anyhow::anyhow!("--on-produce: {e}"))?;
            out.push((
                keys::PLUGIN_ON_PRODUCE.to_string(),
                quiver_proto::messages::format_chain(&chain),
            ));
        }
        if let Some(p) = &self.on_error {
            p.parse::<crate::topic_config::ErrorPolicy>()
                .map_err(|e| anyhow::anyhow!("--on-error: {e}"))?;
            out.push((keys::PLUGIN_ON_ERROR.to_string(), p.clone()));
        }
        Ok(out)
    }
}

#[derive(Debug, Args)]
pub struct AlterArgs {
    /// Topic name.
    name: String,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Remove the produce-side chain (and reset --on-error to fail).
    #[arg(long, conflicts_with_all = ["on_produce", "on_error"])]
    clear_policy: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FlushArg {
    Batch,
    Interval,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// `quiver produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to write to.
    topic: String,
    /// Split each line at the first SEP into key and value (lines without SEP have no key).
    #[arg(long)]
    key_separator: Option<String>,
    /// Header on every record, NAME=VALUE (repeatable).
    #[arg(long = "header", value_parser = parse_kv)]
    headers: Vec<(String, String)>,
    /// Write every record to this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Acknowledgement to wait for: none, leader or all.
    #[arg(long, default_value = "leader")]
    acks: Acks,
    /// Batch compression: none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: Compression,
    /// Batch linger (ms).
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// `quiver consume`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("start").args(["from_beginning", "offset", "from_time"])))]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Start at the earliest stored record (default: the end, only new records).
    #[arg(long)]
    from_beginning: bool,
    /// Start at this offset (needs --partition when the topic has several).
    #[arg(long)]
    offset: Option<u64>,
    /// Start at the first record at or after this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
    #[arg(long, value_parser = parse_rfc3339)]
    from_time: Option<i64>,
    /// Read only this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Stop after this many records.
    #[arg(long)]
    max_records: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    follow: bool,
    /// Output: the value per line (raw), or one JSON object per record.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// Run this deployed plugin on the node over the records before they are sent,
    /// NAME[@VERSION] (without a version: the highest deployed, swapped when a newer one is
    /// deployed). Repeat for a chain, applied in order.
    #[arg(long = "plugin", value_name = "NAME[@VERSION]")]
    plugins: Vec<String>,
    /// A plugin parameter, KEY=VALUE; with several plugins NAME.KEY=VALUE (or
    /// INDEX.KEY=VALUE, from 1). Repeat as needed.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Raw,
    Json,
}

fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

pub async fn topic(cmd: TopicCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TopicCommand::Create(a) => {
            let mut configs = Vec::new();
            let mut put = |k: &str, v: Option<String>| {
                if let Some(v) = v {
                    configs.push((k.to_string(), v));
                }
            };
            put(keys::RETENTION_MS, a.retention_ms.map(|v| v.to_string()));
            put(
                keys::RETENTION_BYTES,
                a.retention_bytes.map(|v| v.to_string()),
            );
            put(keys::SEGMENT_BYTES, a.segment_bytes.map(|v| v.to_string()));
            put(keys::SEGMENT_MS, a.segment_ms.map(|v| v.to_string()));
            put(
                keys::FLUSH_POLICY,
                a.flush.map(|f| match f {
                    FlushArg::Batch => "batch".to_string(),
                    FlushArg::Interval => "interval".to_string(),
                }),
            );
            put(
                keys::FLUSH_INTERVAL_MS,
                a.flush_interval_ms.map(|v| v.to_string()),
            );
            put(
                keys::MAX_RECORD_BYTES,
                a.max_record_bytes.map(|v| v.to_string()),
            );
            put(
                keys::REPLICATION_FACTOR,
                a.replication_factor.map(|v| v.to_string()),
            );
            put(
                keys::MIN_INSYNC_REPLICAS,
                a.min_insync_replicas.map(|v| v.to_string()),
            );
            configs.extend(a.policy.configs()?);
            configs.extend(a.configs);
            let client = a.connect.connect().await?;
            client.create_topic(&a.name, a.partitions, &configs).await?;
            println!(
                "created topic {} with {} partition(s)",
                a.name, a.partitions
            );
        }
        TopicCommand::Alter(a) => {
            let set = a.policy.configs()?;
            let reset: Vec<String> = if a.clear_policy {
                vec![
                    keys::PLUGIN_ON_PRODUCE.to_string(),
                    keys::PLUGIN_ON_ERROR.to_string(),
                ]
            } else {
                Vec::new()
            };
            if set.is_empty() && reset.is_empty() {
                anyhow::bail!("nothing to change: give --on-produce, --on-error or --clear-policy");
            }
            let client = a.connect.connect().await?;
            client.alter_topic(&a.name, &set, &reset).await?;
            println!("altered topic {}", a.name);
        }
        TopicCommand::List(a) => {
            let client = a.connect.connect().await?;
            for t in client.list_topics().await? {
                println!("{}\t{} partition(s)", t.name, t.partitions);
            }
        }
        TopicCommand::Describe(a) => {
            let client = a.connect.connect().await?;
            let t = client.describe_topic(&a.name).await?;
            println!("topic {}", t.name);
            for (k, v) in &t.configs {
                println!("  {k} = {v}");
            }
            println!("  partition\tstart\thigh-watermark\tend\tbytes\tsegments");
            for p in &t.partitions {
                println!(
                    "  {}\t{}\t{}\t{}\t{}\t{}",
                    p.partition,
                    p.log_start_offset,
                    p.high_watermark,
                    p.log_end_offset,
                    p.size_bytes,
                    p.segments
                );
            }
        }
        TopicCommand::Delete(a) => {
            let client = a.connect.connect().await?;
            client.delete_topic(&a.name).await?;
            println!("deleted topic {}", a.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn produce(a: ProduceArgs) -> anyhow::Result<ExitCode> {
    if a.key_separator.as_deref() == Some("") {
        anyhow::bail!("--key-separator must not be empty");
    }
    let client = a.connect.connect().await?;
    // Fail fast on an unknown topic, before reading any input.
    client.partition_count(&a.topic).await?;
    let producer = Producer::new(
        client,
        ProducerConfig {
            acks: a.acks,
            compression: a.compression,
            linger_ms: a.linger_ms,
            ..ProducerConfig::default()
        },
    );
    let headers: Vec<(String, Option<Bytes>)> = a
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Some(Bytes::from(v.clone()))))
        .collect();
    // Deliveries are awaited by a separate task so reading stdin never waits on the network
    // more than the producer's buffer bound requires.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<quiver_client::DeliveryFuture>(65_536);
    let waiter = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u64, 0u64);
        while let Some(d) = rx.recv().await {
            match d.await {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    if failed <= 10 {
                        eprintln!("error: record not stored: {e}");
                    }
                }
            }
        }
        (ok, failed)
    });
    // Lines are bytes, not text: any value without a newline in it can be produced.
    let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(1024);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            match stdin.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    if line_tx.blocking_send(Ok(line)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = line_tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let sep = a.key_separator.as_deref().map(str::as_bytes);
    while let Some(line) = line_rx.recv().await {
        let line = Bytes::from(line?);
        let split = sep.and_then(|sep| {
            line.windows(sep.len())
                .position(|w| w == sep)
                .map(|at| (at, sep.len()))
        });
        let (key, value) = match split {
            Some((at, n)) => (Some(line.slice(..at)), line.slice(at + n..)),
            None => (None, line),
        };
        let record = ProducerRecord {
            topic: a.topic.clone(),
            partition: a.partition,
            key,
            value: Some(value),
            headers: headers.clone(),
            timestamp_ms: None,
        };
        let delivery = producer.send(record).await?;
        if tx.send(delivery).await.is_err() {
            break;
        }
    }
    drop(tx);
    producer.close().await?;
    let (ok, failed) = waiter.await?;
    eprintln!("produced {ok} record(s) to {}", a.topic);
    if failed > 0 {
        eprintln!("error: {failed} record(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn lossy(b: &Option<Bytes>) -> serde_json::Value {
    match b {
        None => serde_json::Value::Null,
        Some(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
    }
}

fn print_record(out: &mut impl Write, r: &ConsumerRecord, format: Format) -> std::io::Result<()> {
    match format {
        Format::Raw => {
            if let Some(v) = &r.value {
                out.write_all(v)?;
            }
            out.write_all(b"\n")
        }
        Format::Json => {
            let headers: serde_json::Map<String, serde_json::Value> = r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), lossy(v)))
                .collect();
            let obj = serde_json::json!({
                "topic": &*r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "timestamp": r.timestamp,
                "key": lossy(&r.key),
                "value": lossy(&r.value),
                "headers": headers,
            });
            writeln!(out, "{obj}")
        }
    }
}

pub async fn consume(a: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let chain = super::plugin_cmds::chain_from_flags(&a.plugins, &a.params)?;
    let client = a.connect.connect().await?;
    let count = client.partition_count(&a.topic).await?;
    if a.offset.is_some() && a.partition.is_none() && count > 1 {
        anyhow::bail!(
            "--offset needs --partition: topic {} has {count} partitions",
            a.topic
        );
    }
    let mut consumer = Consumer::new(
        client.clone(),
        &a.topic,
        a.partition.map(|p| vec![p]),
        ConsumerConfig {
            chain,
            ..ConsumerConfig::default()
        },
    )
    .await?;
    let start = match (a.from_beginning, a.offset, a.from_time) {
        (true, _, _) => SeekTo::Earliest,
        (_, Some(o), _) => SeekTo::Offset(o),
        (_, _, Some(t)) => SeekTo::Timestamp(t),
        _ => SeekTo::Latest,
    };
    consumer.seek_all(start).await?;
    // Without --follow, stop at the end of the log as it is now.
    let mut ends = std::collections::BTreeMap::new();
    for p in consumer.assignment() {
        let end = client
            .list_offset(&a.topic, p, quiver_proto::messages::LATEST_TIMESTAMP)
            .await?
            .unwrap_or(0);
        ends.insert(p, end);
    }
    let stdout = std::io::stdout();
    let mut printed = 0u64;
    loop {
        if !a.follow
            && ends
                .iter()
                .all(|(p, end)| consumer.position(*p).is_some_and(|pos| pos >= *end))
        {
            break;
        }
        let records = consumer.poll().await?;
        let mut out = stdout.lock();
        for r in &records {
            if !a.follow && ends.get(&r.partition).is_some_and(|end| r.offset >= *end) {
                continue;
            }
            print_record(&mut out, r, a.format)?;
            printed += 1;
            if a.max_records.is_some_and(|m| printed >= m) {
                out.flush()?;
                client.close().await;
                return Ok(ExitCode::SUCCESS);
            }
        }
        out.flush()?;
    }
    client.close().await;
    Ok(ExitCode::SUCCESS)
}
