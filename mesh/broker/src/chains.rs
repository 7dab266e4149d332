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
}

fn failed(key: &str, e: impl std::fmt::Display) -> RegistryError {
    (ErrorCode::PluginFailed, format!("{key}: {e}"))
}

impl RunningChain {
    /// Resolves and starts every step. Blocking (loading and `init`).
    pub fn start(registry: &Registry, spec: &[ChainStep]) -> Result<Self, RegistryError> {
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
                counters: registry.counters(&r.key),
                last: InstanceStats::default(),
                _attached: registry.attach(&r.key),
                key: r.key,
            });
            instances.push(instance);
        }
        let chain = Chain::new(instances).map_err(|e| failed("chain", e))?;
        Ok(Self {
            spec: spec.to_vec(),
            steps,
            chain,
        })
    }

    /// `name@version` of every step, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| s.key.as_str())
    }

    /// At a batch boundary: swaps in the highest deployed version of every step named without
    /// one, when that changed. A version that cannot start is logged and the old one runs on.
    pub fn refresh(&mut self, registry: &Registry) -> Result<(), RegistryError> {
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
            self.account(i);
            match self
                .chain
                .replace_step(i, &r.plugin, self.spec[i].params.clone())
            {
                Ok(()) => {
                    tracing::info!(from = %self.steps[i].key, to = %r.key, "plugin version swapped in");
                    self.steps[i] = Step {
                        sha256: r.plugin.sha256().to_string(),
                        counters: registry.counters(&r.key),
                        last: InstanceStats::default(),
                        _attached: registry.attach(&r.key),
                        key: r.key,
                    };
                }
                Err((e, false)) => {
                    tracing::warn!(plugin = %r.key, error = %e, "new plugin version refused to start; the old one runs on");
                    self.steps[i].last = self.chain.steps()[i].stats().clone();
                }
                Err((e, true)) => return Err(failed(&r.key, e)),
            }
        }
        Ok(())
    }

    fn account(&mut self, i: usize) {
        let now = self.chain.steps()[i].stats().clone();
        self.steps[i].counters.add(&self.steps[i].last, &now);
        self.steps[i].last = now;
    }

    /// Runs one batch through the chain.
    pub fn run(&mut self, batch: &ColumnarBatch) -> Result<ChainOutcome, RegistryError> {
        let result = self.chain.run(batch);
        for i in 0..self.steps.len() {
            self.account(i);
        }
        for (i, instance) in self.chain.steps().iter().enumerate() {
            for line in &instance.report().logs {
                tracing::debug!(plugin = %self.steps[i].key, level = ?line.level, message = %line.message, "plugin log");
            }
        }
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
    let mut out = bytes::BytesMut::new();
    for view in RecordBatches::new(records) {
        let view = view.map_err(|e| (ErrorCode::CorruptBatch, e.to_string()))?;
        let h = *view.header();
        if h.next_offset() <= from || h.is_control() {
            continue;
        }
        chain.refresh(registry)?;
        let mut input = ColumnarBatch::new();
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
        let outcome = chain.run(&input)?;
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
            out.extend_from_slice(view.as_bytes());
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
        let batch = b.finish_sparse(h.base_offset, h.last_offset_delta);
        let start = out.len();
        out.extend_from_slice(&batch);
        set_leader_epoch(&mut out[start..], h.leader_epoch);
    }
    Ok(out.freeze())
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
