//! Pipelines: derived topics. A pipeline reads every partition of its input topic, runs each
//! stored batch through its plugin chain and appends what comes out to its output topics.
//!
//! One task per input partition. A task reads from its committed offset, runs the chain,
//! appends dead letters and then the outputs, waits for every append to be acknowledged, and
//! only then commits the offset after the batch (sled, flushed). A node that stops, or
//! crashes, between an output's acknowledgement and the commit processes that read again at
//! start: **at-least-once**, and the only duplicates are the outputs of the last read of each
//! input partition before the crash. Output acknowledgements follow the output topic's
//! `flush.policy` (with `interval`, a power loss can lose acknowledged output, as for any
//! produce).
//!
//! Definitions live in the catalog (tree `pipelines`), progress in tree `pipeline_progress`
//! (key `name/partition`, the next input offset as 8 little-endian bytes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quiver_proto::ErrorCode;
use quiver_proto::batch::{BatchBuilder, BatchLimits, RecordBatches, validate_batch};
use quiver_proto::messages::{PipelineInfo, PipelinePartition, PipelineSpec, parse_chain};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::catalog::Catalog;
use crate::chains::{RunningChain, Source, SourcePlace, dead_letter, plugin_of};
use crate::topic_config::ErrorPolicy;

/// A pipeline failure, as a protocol code and a message.
pub type PipelineError = (ErrorCode, String);

/// Most input bytes one pipeline task reads per step.
pub const READ_BYTES_MAX: usize = 1 << 20;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Stored {
    from: String,
    to: Vec<String>,
    chain: String,
    on_error: String,
    paused: bool,
    created_ms: i64,
}

#[derive(Debug, Default)]
struct PartStats {
    committed: AtomicU64,
    records_in: AtomicU64,
    records_out: AtomicU64,
    records_failed: AtomicU64,
    state: Mutex<String>,
}

impl PartStats {
    fn set_state(&self, s: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s.into();
    }
}

#[derive(Debug)]
struct Running {
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Every pipeline of the node.
#[derive(Debug)]
pub struct Pipelines {
    broker: Arc<Broker>,
    catalog: Catalog,
    defs: sled::Tree,
    progress: sled::Tree,
    stats: Mutex<HashMap<String, Vec<Arc<PartStats>>>>,
    running: Mutex<HashMap<String, Running>>,
    /// Serialises create, pause, resume and delete.
    admin: tokio::sync::Mutex<()>,
}

fn storage(e: impl std::fmt::Display) -> PipelineError {
    (ErrorCode::StorageError, e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pipelines {
    /// Opens the definitions and starts every pipeline that is not paused.
    pub fn open(broker: Arc<Broker>, catalog: &Catalog) -> anyhow::Result<Arc<Self>> {
        let p = Arc::new(Self {
            broker,
            catalog: catalog.clone(),
            defs: catalog.tree("pipelines")?,
            progress: catalog.tree("pipeline_progress")?,
            stats: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            admin: tokio::sync::Mutex::new(()),
        });
        for (name, stored) in p.all().map_err(|(_, m)| anyhow::anyhow!(m))? {
            if !stored.paused {
                p.start(&name, &stored);
            }
        }
        Ok(p)
    }

    fn all(&self) -> Result<Vec<(String, Stored)>, PipelineError> {
        let mut out = Vec::new();
        for item in self.defs.iter() {
            let (k, v) = item.map_err(storage)?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let s: Stored =
                serde_json::from_slice(&v).map_err(|e| storage(format!("pipeline {name}: {e}")))?;
            out.push((name, s));
        }
        Ok(out)
    }

    fn get(&self, name: &str) -> Result<Option<Stored>, PipelineError> {
        match self.defs.get(name).map_err(storage)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| storage(format!("pipeline {name}: {e}"))),
        }
    }

    fn put(&self, name: &str, s: &Stored) -> Result<(), PipelineError> {
        let v = serde_json::to_vec(s).map_err(storage)?;
        self.defs.insert(name, v).map_err(storage)?;
        self.catalog.flush().map_err(storage)
    }

    fn not_found(name: &str) -> PipelineError {
        (ErrorCode::PipelineNotFound, format!("no pipeline {name}"))
    }

    /// Checks and stores a new pipeline, then starts it at the earliest stored input offset.
    pub async fn create(&self, spec: &PipelineSpec) -> Result<(), PipelineError> {
        let invalid = |m: String| (ErrorCode::InvalidConfig, m);
        crate::plugins::check_name(&spec.name).map_err(|m| {
            (
                ErrorCode::InvalidRequest,
                m.replace("plugin name", "pipeline name"),
            )
        })?;
        let chain = crate::topic_config::check_chain_text(&spec.chain)
            .map_err(|e| invalid(format!("chain: {e}")))?;
        if chain.is_empty() {
            return Err(invalid("a pipeline needs at least one plugin".into()));
        }
        for step in &chain {
            self.broker.plugins().deployed_version(step)?;
        }
        let policy: ErrorPolicy = spec.on_error.parse().map_err(invalid)?;
        let from = self.broker.topic(&spec.from).ok_or_else(|| {
            (
                ErrorCode::UnknownTopicOrPartition,
                format!("input topic {} does not exist", spec.from),
            )
        })?;
        if spec.to.is_empty() {
            return Err(invalid("a pipeline needs at least one output topic".into()));
        }
        for t in spec.to.iter().chain(match &policy {
            ErrorPolicy::Dlq(d) => std::slice::from_ref(d),
            _ => &[],
        }) {
            if t == &spec.from {
                return Err(invalid(format!(
                    "{t} is the input topic; a pipeline cannot write to its own input"
                )));
            }
            if self.broker.topic(t).is_none() {
                return Err((
                    ErrorCode::UnknownTopicOrPartition,
                    format!("topic {t} does not exist; create it first"),
                ));
            }
        }
        let _admin = self.admin.lock().await;
        if self.get(&spec.name)?.is_some() {
            return Err((
                ErrorCode::PipelineExists,
                format!("pipeline {} exists", spec.name),
            ));
        }
        let stored = Stored {
            from: spec.from.clone(),
            to: spec.to.clone(),
            chain: quiver_proto::messages::format_chain(&chain),
            on_error: policy.to_string(),
            paused: false,
            created_ms: crate::now_ms(),
        };
        // Progress starts at each partition's earliest stored offset.
        for (p, part) in from.hosted() {
            let start = part.state().map(|s| s.log_start_offset).unwrap_or(0);
            self.progress
                .insert(progress_key(&spec.name, p), &start.to_le_bytes())
                .map_err(storage)?;
        }
        self.put(&spec.name, &stored)?;
        self.start(&spec.name, &stored);
        tracing::info!(pipeline = %spec.name, from = %spec.from, to = ?spec.to, "pipeline created");
        Ok(())
    }

    /// Pauses (at a batch boundary: the batch in hand is finished and committed) or resumes
    /// (also restarting partitions that failed).
    pub async fn control(&self, name: &str, pause: bool) -> Result<(), PipelineError> {
        let _admin = self.admin.lock().await;
        let mut stored = self.get(name)?.ok_or_else(|| Self::not_found(name))?;
        if pause && stored.paused {
            return Ok(());
        }
        stored.paused = pause;
        // Resuming a running pipeline restarts it, so partitions that failed try again.
        self.stop(name).await;
        self.put(name, &stored)?;
        if !pause {
            self.start(name, &stored);
        }
        tracing::info!(pipeline = %name, paused = pause, "pipeline state changed");
        Ok(())
    }

    /// Stops and forgets a pipeline and its progress; what it wrote stays.
    pub async fn delete(&self, name: &str) -> Result<(), PipelineError> {
        let _admin = self.admin.lock().await;
        if self.get(name)?.is_none() {
            return Err(Self::not_found(name));
        }
        self.stop(name).await;
        self.defs.remove(name).map_err(storage)?;
        for item in self.progress.scan_prefix(format!("{name}/")) {
            let (k, _) = item.map_err(storage)?;
            self.progress.remove(k).map_err(storage)?;
        }
        self.catalog.flush().map_err(storage)?;
        lock(&self.stats).remove(name);
        tracing::info!(pipeline = %name, "pipeline deleted");
        Ok(())
    }

    /// The pipeline named, or all of them when `name` is empty, with their progress.
    pub fn list(&self, name: &str) -> Result<Vec<PipelineInfo>, PipelineError> {
        let all = if name.is_empty() {
            self.all()?
        } else {
            match self.get(name)? {
                Some(s) => vec![(name.to_string(), s)],
                None => return Err(Self::not_found(name)),
            }
        };
        let stats = lock(&self.stats);
        Ok(all
            .into_iter()
            .map(|(n, s)| {
                let input = self.broker.topic(&s.from);
                let count = input.as_ref().map_or(0, |t| t.partitions.len());
                let partitions = (0..count as u32)
                    .map(|p| {
                        let hw = input
                            .as_ref()
                            .and_then(|t| t.partitions[p as usize].as_ref()?.state().ok())
                            .map_or(0, |st| st.high_watermark);
                        let st = stats.get(&n).and_then(|v| v.get(p as usize));
                        // A running task's own view: it moves only after its counters.
                        let committed = match st {
                            Some(x) if !s.paused => x.committed.load(Ordering::Acquire),
                            _ => self.committed(&n, p).unwrap_or(0),
                        };
                        let get = |f: fn(&PartStats) -> &AtomicU64| {
                            st.map_or(0, |x| f(x).load(Ordering::Relaxed))
                        };
                        PipelinePartition {
                            partition: p,
                            committed,
                            high_watermark: hw,
                            records_in: get(|x| &x.records_in),
                            records_out: get(|x| &x.records_out),
                            records_failed: get(|x| &x.records_failed),
                            state: if s.paused {
                                "paused".into()
                            } else {
                                st.map(|x| lock(&x.state).clone())
                                    .unwrap_or_else(|| "stopped".into())
                            },
                        }
                    })
                    .collect();
                PipelineInfo {
                    spec: PipelineSpec {
                        name: n,
                        from: s.from,
                        to: s.to,
                        chain: s.chain,
                        on_error: s.on_error,
                    },
                    paused: s.paused,
                    partitions,
                }
            })
            .collect())
    }

    /// A pipeline that reads, writes or dead-letters to `topic`, if any.
    pub fn using_topic(&self, topic: &str) -> Option<String> {
        self.all().ok()?.into_iter().find_map(|(n, s)| {
            let uses = s.from == topic
                || s.to.iter().any(|t| t == topic)
                || s.on_error == format!("dlq:{topic}");
            uses.then_some(n)
        })
    }

    /// A pipeline whose chain uses `name@version` (by that version, or by name while it is the
    /// highest deployed), paused or not.
    pub fn using_plugin(&self, name: &str, version: &str) -> Option<String> {
        self.all().ok()?.into_iter().find_map(|(n, s)| {
            let uses = parse_chain(&s.chain)
                .unwrap_or_default()
                .iter()
                .any(|step| {
                    step.plugin == name
                        && (step.version == version
                            || (step.version.is_empty()
                                && self
                                    .broker
                                    .plugins()
                                    .deployed_version(step)
                                    .is_ok_and(|v| v == version)))
                });
            uses.then_some(n)
        })
    }

    fn committed(&self, name: &str, partition: u32) -> Option<u64> {
        let v = self.progress.get(progress_key(name, partition)).ok()??;
        Some(u64::from_le_bytes(v.as_ref().try_into().ok()?))
    }

    fn start(&self, name: &str, stored: &Stored) {
        let Some(input) = self.broker.topic(&stored.from) else {
            tracing::warn!(pipeline = %name, from = %stored.from, "input topic is gone; pipeline not started");
            return;
        };
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut stats = Vec::new();
        for p in 0..input.partitions.len() as u32 {
            let st = Arc::new(PartStats::default());
            st.set_state("running");
            st.committed
                .store(self.committed(name, p).unwrap_or(0), Ordering::Release);
            let task = Task {
                broker: self.broker.clone(),
                progress: self.progress.clone(),
                catalog: self.catalog.clone(),
                name: name.to_string(),
                stored: stored.clone(),
                partition: p,
                stats: st.clone(),
                cancel: cancel.clone(),
            };
            stats.push(st);
            tasks.push(tokio::spawn(task.run(self.committed(name, p))));
        }
        lock(&self.stats).insert(name.to_string(), stats);
        lock(&self.running).insert(name.to_string(), Running { cancel, tasks });
    }

    async fn stop(&self, name: &str) {
        let running = lock(&self.running).remove(name);
        if let Some(r) = running {
            r.cancel.cancel();
            for t in r.tasks {
                let _ = t.await;
            }
        }
    }

    /// Stops every pipeline at a batch boundary (node shutdown).
    pub async fn shutdown(&self) {
        let names: Vec<String> = lock(&self.running).keys().cloned().collect();
        for n in names {
            self.stop(&n).await;
        }
    }
}

fn progress_key(name: &str, partition: u32) -> String {
    format!("{name}/{partition}")
}

/// One input partition of one pipeline.
struct Task {
    broker: Arc<Broker>,
    progress: sled::Tree,
    catalog: Catalog,
    name: String,
    stored: Stored,
    partition: u32,
    stats: Arc<PartStats>,
    cancel: CancellationToken,
}

/// What one read became.
#[derive(Default)]
struct Processed {
    /// Batches per (output topic, partition).
    outputs: Vec<(String, u32, Bytes)>,
    dlq: Option<Bytes>,
    next_offset: u64,
    records_in: u64,
    records_out: u64,
    failed: u64,
}

impl Task {
    async fn run(self, committed: Option<u64>) {
        let mut offset = committed.unwrap_or(0);
        self.stats.committed.store(offset, Ordering::Relaxed);
        let mut chain: Option<RunningChain> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            match self.step(&mut chain, &mut offset).await {
                Ok(true) => {
                    backoff = Duration::from_millis(100);
                    self.stats.set_state("running");
                }
                Ok(false) => {}
                Err(Stop::Fatal(reason)) => {
                    tracing::warn!(pipeline = %self.name, partition = self.partition, %reason, "pipeline partition failed; resume it after fixing the cause");
                    self.stats.set_state(format!("failed: {reason}"));
                    break;
                }
                Err(Stop::Retry(reason)) => {
                    self.stats.set_state(format!("retrying: {reason}"));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// One read, process and write; `Ok(false)` when there was nothing to read.
    async fn step(&self, chain: &mut Option<RunningChain>, offset: &mut u64) -> Result<bool, Stop> {
        let input = self
            .broker
            .partition(&self.stored.from, self.partition)
            .map_err(|e| Stop::Fatal(e.message))?;
        let mut watch = input.watch_high_watermark();
        let state = input.state().map_err(|e| Stop::Retry(e.message))?;
        if *offset < state.log_start_offset {
            tracing::warn!(pipeline = %self.name, partition = self.partition, from = *offset, to = state.log_start_offset, "input records were deleted by retention before the pipeline read them");
            *offset = state.log_start_offset;
        }
        if *offset >= state.high_watermark {
            tokio::select! {
                _ = watch.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.cancel.cancelled() => {}
            }
            return Ok(false);
        }
        let (part, from) = (input.clone(), *offset);
        let bytes = tokio::task::spawn_blocking(move || part.read_blocking(from, READ_BYTES_MAX))
            .await
            .map_err(|e| Stop::Retry(e.to_string()))?
            .map_err(|e| Stop::Retry(e.message))?;
        if bytes.is_empty() {
            return Ok(false);
        }
        let taken = chain.take();
        let (b, stored, p) = (self.broker.clone(), self.stored.clone(), self.partition);
        let stored_name = self.name.clone();
        let (back, processed) = tokio::task::spawn_blocking(move || {
            let registry = b.plugins();
            let mut running = match taken {
                Some(c) => c,
                None => {
                    let spec = parse_chain(&stored.chain)
                        .map_err(|e| Stop::Fatal(format!("chain: {e}")))?;
                    let context = format!("pipeline {} {}/{p}", stored_name, stored.from);
                    RunningChain::start(registry, &spec, context)
                        .map_err(|(_, m)| Stop::Fatal(m))?
                }
            };
            let out = process(&mut running, &b, &stored, p, &bytes, from);
            Ok::<_, Stop>((running, out))
        })
        .await
        .map_err(|e| Stop::Retry(e.to_string()))??;
        *chain = Some(back);
        let processed = processed?;
        self.write(&processed).await?;
        // Every output is acknowledged: commit.
        self.progress
            .insert(
                progress_key(&self.name, self.partition),
                &processed.next_offset.to_le_bytes(),
            )
            .map_err(|e| Stop::Retry(e.to_string()))?;
        self.catalog
            .flush()
            .map_err(|e| Stop::Retry(e.to_string()))?;
        *offset = processed.next_offset;
        let s = &self.stats;
        s.records_in
            .fetch_add(processed.records_in, Ordering::Relaxed);
        s.records_out
            .fetch_add(processed.records_out, Ordering::Relaxed);
        s.records_failed
            .fetch_add(processed.failed, Ordering::Relaxed);
        // Last, and released: a status that sees this offset sees the counts above.
        s.committed.store(*offset, Ordering::Release);
        Ok(true)
    }

    /// Appends dead letters, then outputs, and waits for every acknowledgement.
    async fn write(&self, p: &Processed) -> Result<(), Stop> {
        let retry = |e: crate::partition::PartitionError| {
            if e.code == ErrorCode::UnknownTopicOrPartition {
                Stop::Fatal(e.message)
            } else {
                Stop::Retry(e.message)
            }
        };
        if let (Some(dlq), Ok(ErrorPolicy::Dlq(topic))) =
            (&p.dlq, self.stored.on_error.parse::<ErrorPolicy>())
        {
            let count = self
                .broker
                .topic(&topic)
                .map(|t| t.config.partitions)
                .ok_or_else(|| Stop::Fatal(format!("dead-letter topic {topic} is gone")))?;
            let part = self
                .broker
                .partition(&topic, self.partition % count)
                .map_err(retry)?;
            part.enqueue(vec![dlq.clone()])
                .await
                .map_err(retry)?
                .await
                .map_err(retry)?;
        }
        let mut waits = Vec::new();
        for (topic, partition, batch) in &p.outputs {
            let part = self.broker.partition(topic, *partition).map_err(retry)?;
            waits.push(part.enqueue(vec![batch.clone()]).await.map_err(retry)?);
        }
        for w in waits {
            w.await.map_err(retry)?;
        }
        Ok(())
    }
}

enum Stop {
    /// Stop this partition until the pipeline is resumed (or the node restarts).
    Fatal(String),
    /// Try the same read again after a backoff.
    Retry(String),
}

/// Runs the chain over the stored batches of one read and routes what comes out.
fn process(
    chain: &mut RunningChain,
    broker: &Broker,
    stored: &Stored,
    partition: u32,
    bytes: &Bytes,
    from: u64,
) -> Result<Processed, Stop> {
    let policy: ErrorPolicy = stored.on_error.parse().map_err(Stop::Fatal)?;
    let mut out = Processed {
        next_offset: from,
        ..Processed::default()
    };
    let source = Source {
        topic: &stored.from,
        partition,
    };
    let mut dlq = BatchBuilder::new(quiver_proto::Compression::None);
    // Output builders by (topic, partition), in first-use order.
    let mut builders: Vec<((String, u32), BatchBuilder)> = Vec::new();
    let counts: Vec<u32> = stored
        .to
        .iter()
        .map(|t| broker.topic(t).map_or(0, |t| t.config.partitions))
        .collect();
    if let Some(i) = counts.iter().position(|c| *c == 0) {
        return Err(Stop::Fatal(format!(
            "output topic {} is gone",
            stored.to[i]
        )));
    }
    for view in RecordBatches::new(bytes) {
        let view = view.map_err(|e| Stop::Retry(e.to_string()))?;
        let h = *view.header();
        out.next_offset = out.next_offset.max(h.next_offset());
        if h.next_offset() <= from || h.is_control() {
            continue;
        }
        let mut input = quiver_runtime::ColumnarBatch::new();
        view.for_each_record(usize::MAX, |r| {
            let offset = h.base_offset + u64::from(r.offset_delta);
            if offset < from {
                return;
            }
            if r.header_count() == 0 {
                input.push(offset, r.timestamp, r.key, r.value, &[]);
            } else {
                let hs: Vec<(&str, Option<&[u8]>)> =
                    r.headers().map(|x| (x.key, x.value)).collect();
                input.push(offset, r.timestamp, r.key, r.value, &hs);
            }
        })
        .map_err(|e| Stop::Retry(e.to_string()))?;
        if input.is_empty() {
            continue;
        }
        out.records_in += input.len() as u64;
        chain
            .refresh(broker.plugins())
            .map_err(|(_, m)| Stop::Fatal(m))?;
        let outcome = match chain.run(broker.plugins(), &input) {
            Ok(o) => o,
            Err((_, message)) => {
                // The plugin failed on the batch as a whole.
                match &policy {
                    ErrorPolicy::Fail => {
                        return Err(Stop::Fatal(format!(
                            "offsets {}..{}: {message}",
                            input.view(0).offset,
                            h.next_offset()
                        )));
                    }
                    ErrorPolicy::Skip => {}
                    ErrorPolicy::Dlq(_) => {
                        for i in 0..input.len() {
                            let r = input.view(i);
                            let at = r.offset;
                            dead_letter(
                                &mut dlq,
                                &r,
                                plugin_of(&message),
                                &message,
                                &source,
                                SourcePlace::Offset(at),
                            );
                        }
                    }
                }
                out.failed += input.len() as u64;
                continue;
            }
        };
        let mut failures: Vec<(usize, String, String)> = outcome
            .failures
            .iter()
            .map(|(i, step, reason)| (*i, chain.step_key(*step).to_string(), reason.clone()))
            .collect();
        for j in 0..outcome.kept.len() {
            let r = outcome.view(&input, j);
            let routed = outcome.topics.get(j).cloned().flatten();
            let ti = match &routed {
                None => 0,
                Some(t) => match stored.to.iter().position(|x| x == t) {
                    Some(i) => i,
                    None => {
                        failures.push((
                            outcome.kept[j],
                            chain.step_key(chain.keys().count() - 1).to_string(),
                            format!("routed to {t}, which is not an output of this pipeline"),
                        ));
                        continue;
                    }
                },
            };
            let target = match r.key {
                Some(k) => (quiver_client::murmur2(k) & 0x7fff_ffff) % counts[ti],
                None => partition % counts[ti],
            };
            let key = (stored.to[ti].clone(), target);
            let b = match builders.iter_mut().position(|(k, _)| *k == key) {
                Some(i) => &mut builders[i].1,
                None => {
                    let codec = h.compression().unwrap_or(quiver_proto::Compression::None);
                    builders.push((key, BatchBuilder::new(codec)));
                    &mut builders.last_mut().expect("just pushed").1
                }
            };
            let hs: Vec<(&str, Option<&[u8]>)> = r.headers().collect();
            b.push(r.key, r.value, &hs, r.timestamp);
            out.records_out += 1;
        }
        if let Some((i, plugin, reason)) = failures.first() {
            match &policy {
                ErrorPolicy::Fail => {
                    return Err(Stop::Fatal(format!(
                        "record at offset {} failed in {plugin}: {reason}",
                        input.view(*i).offset
                    )));
                }
                ErrorPolicy::Skip => {}
                ErrorPolicy::Dlq(_) => {
                    for (i, plugin, reason) in &failures {
                        let r = input.view(*i);
                        let at = r.offset;
                        dead_letter(
                            &mut dlq,
                            &r,
                            plugin,
                            reason,
                            &source,
                            SourcePlace::Offset(at),
                        );
                    }
                }
            }
            out.failed += failures.len() as u64;
        }
    }
    for ((topic, p), mut b) in builders {
        if b.is_empty() {
            continue;
        }
        let batch = b.finish();
        let limit = broker
            .topic(&topic)
            .map_or(0, |t| t.config.max_record_bytes as usize);
        let limits = BatchLimits {
            record_bytes_max: limit,
            batch_bytes_max: usize::MAX,
        };
        validate_batch(&batch, &limits)
            .map_err(|e| Stop::Fatal(format!("output for {topic}/{p} is not storable: {e}")))?;
        out.outputs.push((topic, p, batch));
    }
    if !dlq.is_empty() {
        out.dlq = Some(dlq.finish());
    }
    Ok(out)
}
