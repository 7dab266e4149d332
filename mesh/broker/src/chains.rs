//! Plugin chains running in the node: resolving a chain's steps in the registry, running
//! them over stored batches, and re-encoding what they keep.
//!
//! A [`RunningChain`] owns one instance per step, for one partition (keyed state is scoped
//! per instance and partition). Steps named without a version follow the highest deployed
//! version: before every batch the chain checks the registry and swaps a newer version in,
//! handing it the old instance's keyed state, so no record is run twice or skipped.
//!
//! Consumer-side chains ([`ConnectionChains`]) live as long as the connection that named
//! them; each partition's chain runs one batch at a time on a blocking thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use quiver_proto::batch::{BatchBuilder, RecordBatches, set_leader_epoch};
use quiver_proto::messages::ChainStep;
use quiver_proto::{Compression, ErrorCode};
use quiver_runtime::{Chain, ChainOutcome, ColumnarBatch, InstanceStats, MemoryState};

use crate::plugins::{Attached, Counters, Registry, RegistryError};

/// Keyed state one instance may hold, bytes.
pub const STATE_BYTES_MAX: usize = 16 << 20;

#[derive(Debug)]
struct Step {
    key: String,
    sha256: String,
    /// A newer component that refused to start here: not tried again until another one is
    /// deployed.
    refused: Option<String>,
    counters: Arc<Counters>,
    last: InstanceStats,
    _attached: Attached,
}

/// One partition's instances of a chain.
#[derive(Debug)]
pub struct RunningChain {
    spec: Vec<ChainStep>,
    steps: Vec<Step>,
    chain: Chain,
    context: String,
    /// The columnar batch records are decoded into, reused from batch to batch.
    scratch: ColumnarBatch,
    /// A step was lost in a failed swap: the chain must not run again.
    broken: bool,
    /// Next provisional offset given to produce-side records (see [`apply_policy`]).
    provisional: Option<u64>,
}

fn failed(key: &str, e: impl std::fmt::Display) -> RegistryError {
    (ErrorCode::PluginFailed, format!("{key}: {e}"))
}

impl RunningChain {
    /// Resolves and starts every step. Blocking (loading and `init`). `context` says where
    /// it runs, for its log lines (`fetch TOPIC/P`, ...).
    pub fn start(
        registry: &Registry,
        spec: &[ChainStep],
        context: String,
    ) -> Result<Self, RegistryError> {
        if spec.is_empty() {
            return Err((ErrorCode::InvalidRequest, "an empty plugin chain".into()));
        }
        let mut steps = Vec::with_capacity(spec.len());
        let mut instances = Vec::with_capacity(spec.len());
        for s in spec {
            let r = registry.resolve(s)?;
            let instance = r
                .plugin
                .instantiate(
                    s.params.clone(),
                    Box::new(MemoryState::new(STATE_BYTES_MAX)),
                )
                .map_err(|e| failed(&r.key, e.error))?;
            steps.push(Step {
                sha256: r.plugin.sha256().to_string(),
                refused: None,
                counters: registry.counters(&r.key),
                last: InstanceStats::default(),
                _attached: registry.attach(&r.key),
                key: r.key,
            });
            instances.push(instance);
        }
        let mut chain = Chain::new(instances).map_err(|e| failed("chain", e))?;
        // What `init` logged.
        for (i, report) in chain.take_reports() {
            registry.ship_logs(&steps[i].key, &context, report);
        }
        Ok(Self {
            spec: spec.to_vec(),
            steps,
            chain,
            context,
            scratch: ColumnarBatch::new(),
            broken: false,
            provisional: None,
        })
    }

    /// `name@version` of step `i`.
    pub fn step_key(&self, i: usize) -> &str {
        self.steps.get(i).map_or("?", |s| s.key.as_str())
    }

    /// The chain this was started for.
    pub fn spec(&self) -> &[ChainStep] {
        &self.spec
    }

    /// `name@version` of every step, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| s.key.as_str())
    }

    /// Whether a failed swap lost a step; such a chain refuses to run and must be dropped.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn check_whole(&self) -> Result<(), RegistryError> {
        if self.broken {
            return Err((
                ErrorCode::PluginFailed,
                "the chain lost a step in a failed version swap; it is restarted".into(),
            ));
        }
        Ok(())
    }

    /// At a batch boundary: swaps in the highest deployed version of every step named without
    /// one, when that changed. A version that cannot start is logged, not tried again until
    /// another version is deployed, and the old one runs on.
    pub fn refresh(&mut self, registry: &Registry) -> Result<(), RegistryError> {
        self.check_whole()?;
        for i in 0..self.spec.len() {
            if !self.spec[i].version.is_empty() {
                continue;
            }
            let Ok(r) = registry.resolve(&self.spec[i]) else {
                continue;
            };
            if r.key == self.steps[i].key && r.plugin.sha256() == self.steps[i].sha256 {
                continue;
            }
            if self.steps[i].refused.as_deref() == Some(r.plugin.sha256()) {
                continue;
            }
            self.account(i);
            match self
                .chain
                .replace_step(i, &r.plugin, self.spec[i].params.clone())
            {
                Ok(()) => {
                    tracing::info!(from = %self.steps[i].key, to = %r.key, "plugin version swapped in");
                    self.steps[i] = Step {
                        sha256: r.plugin.sha256().to_string(),
                        refused: None,
                        counters: registry.counters(&r.key),
                        last: InstanceStats::default(),
                        _attached: registry.attach(&r.key),
                        key: r.key,
                    };
                    self.ship_logs(registry);
                }
                Err((e, false)) => {
                    tracing::warn!(plugin = %r.key, error = %e, "new plugin version refused to start; the old one runs on");
                    self.steps[i].refused = Some(r.plugin.sha256().to_string());
                    self.steps[i].last = self.chain.steps()[i].stats().clone();
                }
                Err((e, true)) => {
                    self.broken = true;
                    return Err(failed(&r.key, e));
                }
            }
        }
        Ok(())
    }

    fn account(&mut self, i: usize) {
        let now = self.chain.steps()[i].stats().clone();
        self.steps[i].counters.add(&self.steps[i].last, &now);
        self.steps[i].last = now;
    }

    fn ship_logs(&mut self, registry: &Registry) {
        for (i, report) in self.chain.take_reports() {
            registry.ship_logs(&self.steps[i].key, &self.context, report);
        }
    }

    /// Runs one batch through the chain; what the guests logged goes to the log topic.
    pub fn run(
        &mut self,
        registry: &Registry,
        batch: &ColumnarBatch,
    ) -> Result<ChainOutcome, RegistryError> {
        self.check_whole()?;
        let result = self.chain.run(batch);
        for i in 0..self.steps.len() {
            self.account(i);
        }
        self.ship_logs(registry);
        result.map_err(|(step, e)| failed(&self.steps[step].key, e))
    }
}

/// Runs `chain` over the stored batches `records` of one partition, from offset `from`.
/// Returns the batches to send: a batch whose records all pass unchanged is sent as stored;
/// one that lost records or was transformed is re-encoded with its codec, keeping its base
/// offset, last offset delta and leader epoch, so kept records keep their offsets (a
/// transform's outputs take their source record's). Records a plugin fails are skipped.
pub fn filter_stored(
    chain: &mut RunningChain,
    registry: &Registry,
    records: &Bytes,
    from: u64,
) -> Result<Bytes, RegistryError> {
    // What goes out: ranges of `records` sent as stored, and re-encoded batches. When every
    // batch goes out as stored the answer is one slice of `records` (no copy).
    enum Piece {
        Stored(std::ops::Range<usize>),
        New(Bytes),
    }
    let mut pieces: Vec<Piece> = Vec::new();
    let base = records.as_ptr() as usize;
    let mut input = std::mem::take(&mut chain.scratch);
    // The log checked every batch's CRC when it read them.
    for view in RecordBatches::verified(records) {
        let view = view.map_err(|e| (ErrorCode::CorruptBatch, e.to_string()))?;
        let h = *view.header();
        if h.next_offset() <= from || h.is_control() {
            continue;
        }
        chain.refresh(registry)?;
        input.clear();
        input.reserve(h.record_count as usize, view.as_bytes().len());
        let mut skipped = 0usize;
        view.for_each_record(usize::MAX, |r| {
            let offset = h.base_offset + u64::from(r.offset_delta);
            if offset < from {
                skipped += 1;
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
        .map_err(|e| (ErrorCode::CorruptBatch, e.to_string()))?;
        if input.is_empty() {
            continue;
        }
        let outcome = chain.run(registry, &input)?;
        if !outcome.failures.is_empty() {
            tracing::debug!(
                plugins = ?chain.keys().collect::<Vec<_>>(),
                failed = outcome.failures.len(),
                "records failed in a fetch chain were skipped"
            );
        }
        if outcome.kept.is_empty() {
            continue;
        }
        let untouched =
            skipped == 0 && outcome.output.is_none() && outcome.kept.len() == input.len();
        if untouched {
            let start = view.as_bytes().as_ptr() as usize - base;
            let range = start..start + view.as_bytes().len();
            match pieces.last_mut() {
                Some(Piece::Stored(r)) if r.end == range.start => r.end = range.end,
                _ => pieces.push(Piece::Stored(range)),
            }
            continue;
        }
        let compression = h.compression().unwrap_or(Compression::None);
        let mut b = BatchBuilder::with_capacity(compression, input.data_bytes());
        let mut hs: Vec<(&str, Option<&[u8]>)> = Vec::new();
        for j in 0..outcome.kept.len() {
            let r = outcome.view(&input, j);
            let offset = input.view(outcome.kept[j]).offset;
            hs.clear();
            hs.extend(r.headers());
            b.push_at(
                (offset - h.base_offset) as u32,
                r.key,
                r.value,
                &hs,
                r.timestamp,
            );
        }
        let mut batch = b.finish_sparse(h.base_offset, h.last_offset_delta).to_vec();
        set_leader_epoch(&mut batch, h.leader_epoch);
        pieces.push(Piece::New(Bytes::from(batch)));
    }
    chain.scratch = input;
    Ok(match pieces.as_slice() {
        [] => Bytes::new(),
        [Piece::Stored(r)] => records.slice(r.clone()),
        _ => {
            let total = pieces
                .iter()
                .map(|p| match p {
                    Piece::Stored(r) => r.len(),
                    Piece::New(b) => b.len(),
                })
                .sum();
            let mut out = bytes::BytesMut::with_capacity(total);
            for p in &pieces {
                match p {
                    Piece::Stored(r) => out.extend_from_slice(&records[r.clone()]),
                    Piece::New(b) => out.extend_from_slice(b),
                }
            }
            out.freeze()
        }
    })
}

/// Where a fetch chain's partition instances live for one connection.
type SlotKey = (Vec<ChainStep>, String, u32);
type Slot = Arc<tokio::sync::Mutex<Option<RunningChain>>>;

/// The consumer-side chains a connection named, one per (chain, topic, partition), alive
/// until the connection closes.
#[derive(Debug)]
pub struct ConnectionChains {
    slots: Mutex<HashMap<SlotKey, Slot>>,
    slots_max: usize,
}

impl ConnectionChains {
    /// At most `slots_max` chains at once per connection.
    pub fn new(slots_max: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            slots_max,
        }
    }

    /// The slot for a chain on a partition; an idle slot is evicted when the connection is
    /// at its limit (its keyed state is lost), `busy` when none is idle.
    pub fn slot(
        &self,
        chain: &[ChainStep],
        topic: &str,
        partition: u32,
    ) -> Result<Slot, RegistryError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let key = (chain.to_vec(), topic.to_string(), partition);
        if let Some(s) = slots.get(&key) {
            return Ok(s.clone());
        }
        if slots.len() >= self.slots_max {
            let idle = slots
                .iter()
                .find(|(_, s)| Arc::strong_count(s) == 1 && s.try_lock().is_ok())
                .map(|(k, _)| k.clone());
            match idle {
                Some(k) => {
                    slots.remove(&k);
                }
                None => {
                    return Err((
                        ErrorCode::Busy,
                        format!(
                            "this connection runs {} fetch chains, the most allowed",
                            self.slots_max
                        ),
                    ));
                }
            }
        }
        let s: Slot = Arc::new(tokio::sync::Mutex::new(None));
        slots.insert(key, s.clone());
        Ok(s)
    }
}

/// What a produce-side policy made of one partition's produced batches.
#[derive(Debug, Default)]
pub struct PolicyOutcome {
    /// Batches to append (each untouched batch as produced, others re-encoded).
    pub batches: Vec<Bytes>,
    /// Records for the dead-letter topic, as one batch (empty when none).
    pub dlq: Option<Bytes>,
    /// Records dropped by the chain (filtered out).
    pub dropped: u64,
    /// Records that failed and were skipped or sent to the dead-letter topic.
    pub failed: u64,
}

/// Headers a dead-letter record carries besides its own.
pub mod dlq_headers {
    /// `name@version` of the plugin that failed the record.
    pub const PLUGIN: &str = "quiver.plugin";
    /// The reason.
    pub const ERROR: &str = "quiver.error";
    /// Topic the record was produced to.
    pub const SOURCE_TOPIC: &str = "quiver.source.topic";
    /// Partition it was produced to (decimal).
    pub const SOURCE_PARTITION: &str = "quiver.source.partition";
    /// Its offset in the source partition (decimal), for records that have one (pipelines);
    /// a record refused on produce was never stored, so it has none.
    pub const SOURCE_OFFSET: &str = "quiver.source.offset";
    /// Its position among the records of the produce request for that partition (decimal).
    pub const SOURCE_INDEX: &str = "quiver.source.index";
}

/// Where a record that failed came from, for the dead-letter headers.
#[derive(Clone, Debug)]
pub struct Source<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: u32,
}

/// Where a dead-letter record came from in its source partition.
#[derive(Clone, Copy, Debug)]
pub enum SourcePlace {
    /// Its offset (the record was stored there: pipelines).
    Offset(u64),
    /// Its position among a produce request's records (it was never stored).
    Index(u64),
}

/// Appends a dead-letter copy of `r` to `dlq`: the record unchanged, plus headers naming the
/// plugin, the reason and the source.
pub fn dead_letter(
    dlq: &mut BatchBuilder,
    r: &quiver_runtime::RecordView<'_>,
    plugin: &str,
    reason: &str,
    source: &Source<'_>,
    place: SourcePlace,
) {
    let mut hs: Vec<(&str, Option<&[u8]>)> = r.headers().collect();
    let partition = source.partition.to_string();
    let (key, at) = match place {
        SourcePlace::Offset(o) => (dlq_headers::SOURCE_OFFSET, o.to_string()),
        SourcePlace::Index(i) => (dlq_headers::SOURCE_INDEX, i.to_string()),
    };
    hs.push((dlq_headers::PLUGIN, Some(plugin.as_bytes())));
    hs.push((dlq_headers::ERROR, Some(reason.as_bytes())));
    hs.push((dlq_headers::SOURCE_TOPIC, Some(source.topic.as_bytes())));
    hs.push((dlq_headers::SOURCE_PARTITION, Some(partition.as_bytes())));
    hs.push((key, Some(at.as_bytes())));
    dlq.push(r.key, r.value, &hs, r.timestamp);
}

/// The plugin (`name@version`) a [`RunningChain::run`] error names.
pub fn plugin_of(message: &str) -> &str {
    message.split(": ").next().unwrap_or_default()
}

fn show_key(key: Option<&[u8]>) -> String {
    match key {
        None => "no key".to_string(),
        Some(k) => {
            let s = String::from_utf8_lossy(&k[..k.len().min(64)]);
            format!("key {s:?}")
        }
    }
}

/// Runs a produce-side policy chain over one partition's validated batches, in order.
/// Records have no offsets yet: plugins see provisional ones, increasing and unique for the
/// life of this chain instance (starting at the partition's log end when it started; not the
/// offsets records get when stored, since dropped records take none). Errors and dead
/// letters name a record by its position among the request's records for the partition. `policy` decides what a failed record, or a batch a plugin failed
/// on, becomes: an error for the whole partition (`fail`), nothing (`skip`), or a
/// dead-letter record (`dlq`). Output topics a transform names are ignored here.
pub fn apply_policy(
    chain: &mut RunningChain,
    registry: &Registry,
    batches: &[Bytes],
    source: &Source<'_>,
    policy: &crate::topic_config::ErrorPolicy,
    log_end: u64,
) -> Result<PolicyOutcome, RegistryError> {
    use crate::topic_config::ErrorPolicy;
    let mut out = PolicyOutcome::default();
    let mut dlq = BatchBuilder::new(Compression::None);
    let mut index = 0u64;
    let mut provisional = *chain.provisional.get_or_insert(log_end);
    for (bi, bytes) in batches.iter().enumerate() {
        let view = quiver_proto::batch::BatchView::parse(bytes)
            .map_err(|e| (ErrorCode::InvalidBatch, e.to_string()))?;
        let h = *view.header();
        let first = index;
        let mut input = ColumnarBatch::new();
        view.for_each_record(usize::MAX, |r| {
            if r.header_count() == 0 {
                input.push(provisional, r.timestamp, r.key, r.value, &[]);
            } else {
                let hs: Vec<(&str, Option<&[u8]>)> =
                    r.headers().map(|x| (x.key, x.value)).collect();
                input.push(provisional, r.timestamp, r.key, r.value, &hs);
            }
            index += 1;
            provisional += 1;
        })
        .map_err(|e| (ErrorCode::InvalidBatch, e.to_string()))?;
        chain.provisional = Some(provisional);
        chain.refresh(registry)?;
        let mut to_dlq = |records: &mut dyn Iterator<Item = (usize, String, String)>| {
            for (i, plugin, reason) in records {
                let at = SourcePlace::Index(first + i as u64);
                dead_letter(&mut dlq, &input.view(i), &plugin, &reason, source, at);
            }
        };
        let outcome = match chain.run(registry, &input) {
            Ok(o) => o,
            Err((code, message)) => {
                // The plugin failed on the batch as a whole: every record of it failed.
                let n = input.len();
                match policy {
                    ErrorPolicy::Fail => {
                        return Err((
                            code,
                            format!("batch {bi} (records {first}..{index}): {message}"),
                        ));
                    }
                    ErrorPolicy::Skip => {}
                    ErrorPolicy::Dlq(_) => {
                        let plugin = plugin_of(&message).to_string();
                        to_dlq(&mut (0..n).map(|i| (i, plugin.clone(), message.clone())));
                    }
                }
                out.failed += n as u64;
                continue;
            }
        };
        if let Some((i, step, reason)) = outcome.failures.first() {
            let plugin = chain.step_key(*step).to_string();
            match policy {
                ErrorPolicy::Fail => {
                    let r = input.view(*i);
                    return Err((
                        ErrorCode::PluginFailed,
                        format!(
                            "record {} ({}) failed in {plugin}: {reason}",
                            first + *i as u64,
                            show_key(r.key)
                        ),
                    ));
                }
                ErrorPolicy::Skip => {}
                ErrorPolicy::Dlq(_) => {
                    to_dlq(&mut outcome.failures.iter().map(|(i, step, reason)| {
                        (*i, chain.step_key(*step).to_string(), reason.clone())
                    }));
                }
            }
            out.failed += outcome.failures.len() as u64;
        }
        let passed = outcome.kept.len();
        let mut sources = outcome.kept.clone();
        sources.dedup();
        out.dropped += input
            .len()
            .saturating_sub(sources.len() + outcome.failures.len()) as u64;
        if passed == 0 {
            continue;
        }
        if outcome.output.is_none() && passed == input.len() {
            out.batches.push(bytes.clone());
            continue;
        }
        let compression = h.compression().unwrap_or(Compression::None);
        let mut b = BatchBuilder::with_capacity(compression, input.data_bytes());
        let mut hs: Vec<(&str, Option<&[u8]>)> = Vec::new();
        for j in 0..passed {
            let r = outcome.view(&input, j);
            hs.clear();
            hs.extend(r.headers());
            b.push(r.key, r.value, &hs, r.timestamp);
        }
        out.batches.push(b.finish());
    }
    if !dlq.is_empty() {
        out.dlq = Some(dlq.finish());
    }
    Ok(out)
}
