//! The Quiver Wasm host: loads plugin components (the `filter` and `transform` worlds of
//! `wit/`) and runs batches of records through them under limits.
//!
//! - One [`Runtime`] per node: one wasmtime engine (Cranelift; epoch interruption with a
//!   per-call deadline; component-model concurrency off; the pooling allocator where the OS
//!   grants its address space, on-demand allocation otherwise), a linker with the host
//!   imports and a WASI context without capabilities, and the on-disk cache of precompiled
//!   components.
//! - A [`Plugin`] is a validated, compiled component of one world, pre-instantiated; cheap to
//!   share between partitions.
//! - An [`Instance`] runs batches for one partition (one store, one memory cap, its keyed
//!   state). A trap, timeout or refused memory growth is a typed [`PluginError`]; the
//!   instance is then rebuilt from its pre-instantiated plugin (and `init` run again) before
//!   the next batch, keeping its keyed state.
//! - A [`Chain`] runs filters one after another; a step that keeps every record passes the
//!   batch on as it is, without rebuilding it.
//!
//! Architecture invariant: this crate knows nothing about partitions, replication or storage.
//! It runs batches through components and reports what they did.

mod bindings;
mod cache;
mod columnar;
mod host;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config as EngineConfig, Engine, InstanceAllocationStrategy, Store, Trap};

pub use cache::{CacheOutcome, sha256_hex};
pub use columnar::{ColumnarBatch, PluginRecord, RecordView};
pub use host::{LogLevel, LogLine, LogSource, MemoryState, MetricValue, StateStore};

use bindings::filter::{Filter as FilterWorld, FilterPre};
use bindings::transform::{Transform as TransformWorld, TransformPre};
use host::{HostLimits, HostState};

/// Settings of a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Directory for precompiled components (`None`: compile on every load).
    pub cache_dir: Option<PathBuf>,
    /// Linear memory one instance may grow to, bytes.
    pub memory_bytes_max: usize,
    /// Longest one call (one batch) may run, ms.
    pub call_ms_max: u64,
    /// Epoch tick, ms: the granularity of the deadline.
    pub epoch_tick_ms: u64,
    /// Instances alive at once across the runtime (sizes the pooling allocator).
    pub instances_max: u32,
    /// Log lines (log calls and printed lines) kept per call; the rest are counted.
    pub log_lines_per_call_max: usize,
    /// Longest kept log message or field value, bytes.
    pub log_line_bytes_max: usize,
    /// Bytes of log messages and fields kept per call.
    pub log_bytes_per_call_max: usize,
    /// stdout and stderr bytes kept per call, each.
    pub output_bytes_per_call_max: usize,
    /// Distinct metric names per instance.
    pub metrics_max: usize,
    /// Largest transform output per call (keys, values and headers), bytes.
    pub output_data_bytes_max: usize,
    /// Try the pooling allocator (falls back to on-demand allocation if the OS refuses it).
    pub pooling: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            memory_bytes_max: 64 << 20,
            call_ms_max: 1_000,
            epoch_tick_ms: 5,
            instances_max: 256,
            log_lines_per_call_max: 1_000,
            log_line_bytes_max: 4 << 10,
            log_bytes_per_call_max: 256 << 10,
            output_bytes_per_call_max: 64 << 10,
            metrics_max: 256,
            output_data_bytes_max: 64 << 20,
            pooling: true,
        }
    }
}

/// What went wrong running a plugin.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The component could not be compiled, validated against the worlds, or instantiated.
    #[error("plugin rejected: {0}")]
    Invalid(String),
    /// `init` refused its configuration or failed.
    #[error("plugin init failed: {0}")]
    InitFailed(String),
    /// The guest trapped (a panic, an unreachable, an out-of-bounds access).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The guest ran past its deadline.
    #[error("plugin timed out after {0} ms")]
    Timeout(u64),
    /// The guest asked for more memory than its cap.
    #[error("plugin ran out of memory (limit {0} bytes)")]
    OutOfMemory(usize),
    /// The guest answered with output that breaks the contract.
    #[error("plugin returned invalid output: {0}")]
    InvalidOutput(String),
    /// The guest reported a failure of its own (`plugin-error.internal`).
    #[error("plugin failed: {0}")]
    Failed(String),
}

/// Which world a component implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginKind {
    /// `quiver:plugin/filter`.
    Filter,
    /// `quiver:plugin/transform`.
    Transform,
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginKind::Filter => "filter",
            PluginKind::Transform => "transform",
        })
    }
}

/// Stops the epoch ticker when the runtime goes.
#[derive(Debug)]
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    pooling: bool,
    _ticker: Ticker,
}

/// The node's Wasm host. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.config)
            .field("pooling", &self.inner.pooling)
            .finish_non_exhaustive()
    }
}

fn engine_config(config: &RuntimeConfig, pooling: bool) -> EngineConfig {
    let mut c = EngineConfig::new();
    c.strategy(wasmtime::Strategy::Cranelift)
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        .epoch_interruption(true)
        // Component-model async is not used: without it every call is ~5x cheaper.
        .concurrency_support(false)
        .wasm_component_model(true)
        .max_wasm_stack(512 << 10)
        .parallel_compilation(true);
    if pooling {
        let n = config.instances_max.max(1);
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(8))
            .max_memory_size(config.memory_bytes_max)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_core_instances_per_component(16);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    c
}

impl Runtime {
    /// Creates the engine, the linker and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, PluginError> {
        let engine = if config.pooling {
            match Engine::new(&engine_config(&config, true)) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "pooling allocator unavailable; allocating on demand");
                    None
                }
            }
        } else {
            None
        };
        let pooling = engine.is_some();
        let engine = match engine {
            Some(e) => e,
            None => Engine::new(&engine_config(&config, false))
                .map_err(|e| PluginError::Invalid(format!("engine: {e:#}")))?,
        };
        let mut linker = Linker::<HostState>::new(&engine);
        let link = |e: wasmtime::Error| PluginError::Invalid(format!("linker: {e:#}"));
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(link)?;
        FilterWorld::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(link)?;
        let stop = Arc::new(AtomicBool::new(false));
        let tick = Duration::from_millis(config.epoch_tick_ms.max(1));
        let thread = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::Builder::new()
                .name("quiver-wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PluginError::Invalid(format!("epoch thread: {e}")))?
        };
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                pooling,
                _ticker: Ticker {
                    stop,
                    thread: Some(thread),
                },
            }),
        })
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.inner.pooling
    }

    /// The runtime's settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Validates `wasm` as a component of the `filter` or `transform` world whose imports this
    /// host provides, compiles it (or loads its precompiled artifact) and pre-instantiates it.
    pub fn load(&self, wasm: &[u8]) -> Result<Plugin, PluginError> {
        let sha256 = sha256_hex(wasm);
        let (component, cache) = cache::load_or_compile(
            &self.inner.engine,
            self.inner.config.cache_dir.as_deref(),
            wasm,
            &sha256,
        )
        .map_err(PluginError::Invalid)?;
        self.prepare(component, sha256, cache)
    }

    fn prepare(
        &self,
        component: Component,
        sha256: String,
        cache: CacheOutcome,
    ) -> Result<Plugin, PluginError> {
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Invalid(format!("imports: {e:#}")))?;
        let world = match (FilterPre::new(pre.clone()), TransformPre::new(pre)) {
            (Ok(f), _) => World::Filter(f),
            (_, Ok(t)) => World::Transform(t),
            (Err(f), Err(t)) => {
                return Err(PluginError::Invalid(format!(
                    "the component implements neither world: as a filter: {f:#}; as a transform: {t:#}"
                )));
            }
        };
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                runtime: self.clone(),
                sha256,
                cache,
                world,
            }),
        })
    }

    fn limits(&self) -> HostLimits {
        let c = &self.inner.config;
        HostLimits {
            memory_bytes_max: c.memory_bytes_max,
            log_lines_per_call_max: c.log_lines_per_call_max,
            log_line_bytes_max: c.log_line_bytes_max,
            log_bytes_per_call_max: c.log_bytes_per_call_max,
            output_bytes_per_call_max: c.output_bytes_per_call_max,
            metrics_max: c.metrics_max,
        }
    }
}

#[derive(Clone)]
enum World {
    Filter(FilterPre<HostState>),
    Transform(TransformPre<HostState>),
}

struct PluginInner {
    runtime: Runtime,
    sha256: String,
    cache: CacheOutcome,
    world: World,
}

/// A validated, compiled, pre-instantiated component. Cheap to clone and share.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("kind", &self.kind())
            .field("sha256", &self.inner.sha256)
            .finish()
    }
}

impl Plugin {
    /// The world it implements.
    pub fn kind(&self) -> PluginKind {
        match self.inner.world {
            World::Filter(_) => PluginKind::Filter,
            World::Transform(_) => PluginKind::Transform,
        }
    }

    /// sha256 of the component's bytes, hex.
    pub fn sha256(&self) -> &str {
        &self.inner.sha256
    }

    /// Whether it came from the precompiled cache.
    pub fn cache_outcome(&self) -> CacheOutcome {
        self.inner.cache
    }

    /// A new instance with `config` given to `init`, and `state` as its keyed state. When
    /// it cannot start, the error hands the state back (for the version that runs now).
    pub fn instantiate(
        &self,
        config: Vec<(String, String)>,
        state: Box<dyn StateStore>,
    ) -> Result<Instance, Refused> {
        let mut instance = Instance {
            plugin: self.clone(),
            config,
            live: None,
            pending_state: Some(state),
            pending_metrics: BTreeMap::new(),
            stats: InstanceStats::default(),
            report: CallReport::default(),
        };
        match instance.ensure_live() {
            Ok(()) => Ok(instance),
            Err(error) => Err(Refused {
                error,
                state: instance.into_state(),
            }),
        }
    }
}

/// An instance that could not start, and the keyed state it was given.
pub struct Refused {
    /// Why.
    pub error: PluginError,
    /// The state, untouched by anything but the failed `init`.
    pub state: Box<dyn StateStore>,
}

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Refused({:?})", self.error)
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Refused {}

enum Bound {
    Filter(FilterWorld),
    Transform(TransformWorld),
}

struct Live {
    store: Store<HostState>,
    bound: Bound,
}

/// Counters of one instance over its life.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceStats {
    /// Batches run.
    pub batches: u64,
    /// Records given to the guest.
    pub records_in: u64,
    /// Records kept (filters) or produced (transforms).
    pub records_out: u64,
    /// Records filtered out.
    pub records_dropped: u64,
    /// Records the guest reported as failed.
    pub records_failed: u64,
    /// Calls that ended in a [`PluginError`].
    pub errors: u64,
    /// Times the instance was rebuilt after an error.
    pub rebuilds: u64,
    /// Time spent in the guest, µs.
    pub guest_us: u64,
}

/// What the last call left behind: log lines, and how many were dropped by the limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallReport {
    /// Kept log lines, in order (log calls, then printed lines).
    pub logs: Vec<LogLine>,
    /// Lines (or printed chunks) over the limits, not kept.
    pub logs_dropped: u64,
}

/// Per-record outcome of a filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterOutcome {
    /// One flag per input record: kept or not.
    pub keep: Vec<bool>,
    /// Records the plugin could not judge (index, reason); never kept.
    pub failures: Vec<(u32, String)>,
}

impl FilterOutcome {
    /// Indexes of kept records.
    pub fn kept(&self) -> impl Iterator<Item = usize> + '_ {
        self.keep
            .iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(i, _)| i)
    }
}

/// Output of a transform.
#[derive(Clone, Debug)]
pub struct TransformOutcome {
    /// The produced records (offsets meaningless).
    pub records: ColumnarBatch,
    /// For each output, the index of the input it came from (non-decreasing).
    pub sources: Vec<u32>,
    /// For each output, its topic: `None` for the attachment's own output.
    pub topics: Vec<Option<String>>,
    /// Inputs the plugin could not transform (index, reason).
    pub failures: Vec<(u32, String)>,
}

/// One instance of a plugin: its store, memory and state. Not shared between threads at
/// once; calls block the calling thread (run them off async executors).
pub struct Instance {
    plugin: Plugin,
    config: Vec<(String, String)>,
    live: Option<Live>,
    /// State (and metrics) kept while no store holds them (between a failure and the rebuild).
    pending_state: Option<Box<dyn StateStore>>,
    pending_metrics: BTreeMap<String, MetricValue>,
    stats: InstanceStats,
    report: CallReport,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("plugin", &self.plugin)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// The plugin it runs.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Counters so far.
    pub fn stats(&self) -> &InstanceStats {
        &self.stats
    }

    /// Logs of the last call.
    pub fn report(&self) -> &CallReport {
        &self.report
    }

    /// Takes the logs of the last call (and of `init`), leaving none: for shipping them
    /// exactly once.
    pub fn take_report(&mut self) -> CallReport {
        std::mem::take(&mut self.report)
    }

    /// Metrics the guest reported so far (kept across rebuilds).
    pub fn metrics(&self) -> Vec<(String, MetricValue)> {
        let map = match &self.live {
            Some(l) => &l.store.data().metrics,
            None => &self.pending_metrics,
        };
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Ends the instance and hands back its keyed state (for the next version of the plugin,
    /// swapped in at a batch boundary).
    pub fn into_state(mut self) -> Box<dyn StateStore> {
        match self.live.take() {
            Some(live) => live.store.into_data().state,
            None => self
                .pending_state
                .take()
                .unwrap_or_else(|| Box::new(MemoryState::new(0))),
        }
    }

    /// Builds the store and instance if there is none (first use, or after an error), and
    /// runs `init`.
    fn ensure_live(&mut self) -> Result<(), PluginError> {
        if self.live.is_some() {
            return Ok(());
        }
        let runtime = &self.plugin.inner.runtime;
        let state = self
            .pending_state
            .take()
            .unwrap_or_else(|| Box::new(MemoryState::new(0)));
        let mut host = HostState::new(runtime.limits(), state);
        host.metrics = std::mem::take(&mut self.pending_metrics);
        let mut store = Store::new(&runtime.inner.engine, host);
        store.limiter(|s| s);
        // Bounds what one guest-to-host transfer (a host call's arguments, or a call's lifted
        // result) may make the host allocate; wasmtime copies lists before any check of ours.
        store.set_hostcall_fuel(
            runtime
                .inner
                .config
                .output_data_bytes_max
                .saturating_add(1 << 20),
        );
        let deadline_ticks = deadline_ticks(&runtime.inner.config);
        store.set_epoch_deadline(deadline_ticks);
        let instantiated = match &self.plugin.inner.world {
            World::Filter(pre) => pre.instantiate(&mut store).map(Bound::Filter),
            World::Transform(pre) => pre.instantiate(&mut store).map(Bound::Transform),
        };
        let bound = match instantiated {
            Ok(b) => b,
            Err(e) => {
                let err = classify(&mut store, e, runtime);
                self.park(store.into_data());
                return Err(match err {
                    PluginError::Trap(m) => PluginError::InitFailed(m),
                    other => other,
                });
            }
        };
        store.set_epoch_deadline(deadline_ticks);
        let init = match &bound {
            Bound::Filter(f) => f.call_init(&mut store, &self.config),
            Bound::Transform(t) => t.call_init(&mut store, &self.config),
        };
        store.data_mut().drain_output();
        let failure = match init {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(PluginError::InitFailed(guest_error(e))),
            Err(e) => Some(match classify(&mut store, e, runtime) {
                PluginError::Trap(m) => PluginError::InitFailed(m),
                other => other,
            }),
        };
        self.report = take_report(&mut store);
        if let Some(err) = failure {
            self.park(store.into_data());
            return Err(err);
        }
        self.live = Some(Live { store, bound });
        Ok(())
    }

    /// Runs one call with the deadline armed, timing it, and turning a wasmtime error into a
    /// typed one (after which the instance is rebuilt before its next call).
    fn call<R>(
        &mut self,
        f: impl FnOnce(&Bound, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        // What `init` of a rebuild logged is reported with the call's own lines.
        let mut init_report = CallReport::default();
        if self.live.is_none() {
            // A rebuild after a failure; its own failure counts as an error of this call.
            if let Err(e) = self.ensure_live() {
                self.stats.errors += 1;
                return Err(e);
            }
            self.stats.rebuilds += 1;
            init_report = std::mem::take(&mut self.report);
        }
        let runtime = self.plugin.inner.runtime.clone();
        let Some(live) = self.live.as_mut() else {
            return Err(PluginError::Invalid("no instance".into()));
        };
        let ticks = deadline_ticks(&runtime.inner.config);
        live.store.set_epoch_deadline(ticks);
        live.store.data_mut().memory_refused = false;
        let started = Instant::now();
        let result = f(&live.bound, &mut live.store);
        self.stats.guest_us += started.elapsed().as_micros() as u64;
        live.store.data_mut().drain_output();
        // Classified before the report is taken: a trap's message includes what the guest
        // printed to stderr (a Rust panic message, say).
        let result = result.map_err(|e| classify(&mut live.store, e, &runtime));
        let call_report = take_report(&mut live.store);
        init_report.logs.extend(call_report.logs);
        init_report.logs_dropped += call_report.logs_dropped;
        self.report = init_report;
        match result {
            Ok(r) => Ok(r),
            Err(err) => {
                self.poison();
                Err(err)
            }
        }
    }

    /// Keeps what outlives a store: the keyed state and the metrics.
    fn park(&mut self, host: HostState) {
        self.pending_state = Some(host.state);
        self.pending_metrics = host.metrics;
    }

    /// Drops the store (keeping the keyed state and metrics); the next call rebuilds it.
    fn poison(&mut self) {
        self.stats.errors += 1;
        if let Some(live) = self.live.take() {
            self.park(live.store.into_data());
        }
    }

    /// Runs a filter over `batch`.
    pub fn filter(&mut self, batch: &ColumnarBatch) -> Result<FilterOutcome, PluginError> {
        if self.plugin.kind() != PluginKind::Filter {
            return Err(PluginError::Invalid(format!(
                "{} is a {}, not a filter",
                self.plugin.sha256(),
                self.plugin.kind()
            )));
        }
        let n = batch.len();
        let out = self.call(|bound, store| match bound {
            Bound::Filter(f) => f.call_filter(store, &batch.inner),
            Bound::Transform(_) => Err(wasmtime::format_err!("not a filter")),
        })?;
        let verdicts = match out {
            Ok(v) => v,
            Err(e) => {
                self.poison();
                return Err(PluginError::Failed(guest_error(e)));
            }
        };
        let outcome = check_verdicts(n, verdicts);
        match outcome {
            Ok(o) => {
                self.stats.batches += 1;
                self.stats.records_in += n as u64;
                let kept = o.keep.iter().filter(|k| **k).count() as u64;
                self.stats.records_out += kept;
                self.stats.records_failed += o.failures.len() as u64;
                self.stats.records_dropped += n as u64 - kept - o.failures.len() as u64;
                Ok(o)
            }
            Err(e) => {
                // A guest that broke the contract is not trusted with the next batch as is.
                self.poison();
                Err(PluginError::InvalidOutput(e))
            }
        }
    }

    /// Runs a transform over `batch`.
    pub fn transform(&mut self, batch: &ColumnarBatch) -> Result<TransformOutcome, PluginError> {
        if self.plugin.kind() != PluginKind::Transform {
            return Err(PluginError::Invalid(format!(
                "{} is a {}, not a transform",
                self.plugin.sha256(),
                self.plugin.kind()
            )));
        }
        let n = batch.len();
        let out = self.call(|bound, store| match bound {
            Bound::Transform(t) => t.call_transform(store, &batch.inner),
            Bound::Filter(_) => Err(wasmtime::format_err!("not a transform")),
        })?;
        let output = match out {
            Ok(o) => o,
            Err(e) => {
                self.poison();
                return Err(PluginError::Failed(guest_error(e)));
            }
        };
        let data_max = self.plugin.inner.runtime.inner.config.output_data_bytes_max;
        match check_transform(n, output, data_max) {
            Ok(o) => {
                self.stats.batches += 1;
                self.stats.records_in += n as u64;
                self.stats.records_out += o.records.len() as u64;
                self.stats.records_failed += o.failures.len() as u64;
                Ok(o)
            }
            Err(e) => {
                // A guest that broke the contract is not trusted with the next batch as is.
                self.poison();
                Err(PluginError::InvalidOutput(e))
            }
        }
    }
}

/// Epoch ticks for a call: rounded up, plus one for the tick already under way, so a call
/// never times out before `call_ms_max`.
fn deadline_ticks(config: &RuntimeConfig) -> u64 {
    config.call_ms_max.div_ceil(config.epoch_tick_ms.max(1)) + 1
}

fn take_report(store: &mut Store<HostState>) -> CallReport {
    let data = store.data_mut();
    data.log_bytes = 0;
    CallReport {
        logs: std::mem::take(&mut data.logs),
        logs_dropped: std::mem::take(&mut data.logs_dropped),
    }
}

fn guest_error(e: bindings::GuestError) -> String {
    match e {
        bindings::GuestError::InvalidConfig(m) => format!("invalid config: {m}"),
        bindings::GuestError::Internal(m) => m,
    }
}

/// A wasmtime error as a typed one: the deadline, the memory cap, or a trap (with the guest's
/// last stderr line when it printed one, e.g. a Rust panic message).
fn classify(store: &mut Store<HostState>, e: wasmtime::Error, runtime: &Runtime) -> PluginError {
    let config = &runtime.inner.config;
    if store.data().memory_refused {
        return PluginError::OutOfMemory(config.memory_bytes_max);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return PluginError::Timeout(config.call_ms_max),
        Some(Trap::StackOverflow) => return PluginError::Trap("stack overflow".into()),
        _ => {}
    }
    if format!("{e:#}").contains("fuel allocated for hostcalls has been exhausted") {
        return PluginError::InvalidOutput(format!(
            "the guest passed the host more than {} bytes at once",
            config.output_data_bytes_max
        ));
    }
    let message = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{e:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    // What the guest printed to stderr during the call, e.g. a Rust panic's location and
    // message, bounded.
    let mut stderr = String::new();
    for l in store
        .data()
        .logs
        .iter()
        .filter(|l| l.source == LogSource::Stderr)
    {
        if stderr.len() + l.message.len() > 1024 {
            break;
        }
        if !stderr.is_empty() {
            stderr.push_str(" | ");
        }
        stderr.push_str(&l.message);
    }
    PluginError::Trap(if stderr.is_empty() {
        message
    } else {
        format!("{message}; guest stderr: {stderr}")
    })
}

fn check_verdicts(n: usize, v: bindings::filter::Verdicts) -> Result<FilterOutcome, String> {
    if v.keep.len() != n {
        return Err(format!("{} verdicts for {n} records", v.keep.len()));
    }
    let mut keep = v.keep;
    let failures = check_failures(n, v.failures)?;
    for (i, _) in &failures {
        keep[*i as usize] = false;
    }
    Ok(FilterOutcome { keep, failures })
}

/// Failures name distinct records of the input, in any order; a reason is cut to 1 KiB.
fn check_failures(
    n: usize,
    failures: Vec<bindings::RecordFailure>,
) -> Result<Vec<(u32, String)>, String> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen = vec![false; n];
    let mut out = Vec::with_capacity(failures.len());
    for f in failures {
        let i = f.index as usize;
        if i >= n {
            return Err(format!("failure names record {i} of {n}"));
        }
        if std::mem::replace(&mut seen[i], true) {
            return Err(format!("record {i} is named as failed twice"));
        }
        let mut reason = f.reason;
        if reason.len() > 1024 {
            let mut end = 1024;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        out.push((f.index, reason));
    }
    Ok(out)
}

fn check_transform(
    n: usize,
    o: bindings::transform::Output,
    data_bytes_max: usize,
) -> Result<TransformOutcome, String> {
    let records = ColumnarBatch::from_guest(o.records, data_bytes_max)?;
    let m = records.len();
    if o.sources.len() != m || o.topics.len() != m {
        return Err(format!(
            "{} sources and {} topics for {m} outputs",
            o.sources.len(),
            o.topics.len()
        ));
    }
    if o.sources.windows(2).any(|w| w[0] > w[1]) || o.sources.iter().any(|s| *s as usize >= n) {
        return Err("sources must be non-decreasing input indexes".into());
    }
    if let Some(name) = o.topic_names.iter().find(|t| t.is_empty() || t.len() > 255) {
        return Err(format!(
            "output topic name of {} bytes (1 to 255 allowed)",
            name.len()
        ));
    }
    let topics = o
        .topics
        .iter()
        .map(|t| match *t {
            -1 => Ok(None),
            t if t >= 0 && (t as usize) < o.topic_names.len() => {
                Ok(Some(o.topic_names[t as usize].clone()))
            }
            t => Err(format!("topic index {t} of {} names", o.topic_names.len())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let failures = check_failures(n, o.failures)?;
    if failures.is_empty() {
        return Ok(TransformOutcome {
            records,
            sources: o.sources,
            topics,
            failures,
        });
    }
    // Outputs of a failed input are discarded (the contract says a plugin must not emit
    // them; the node does not trust that it did not).
    let mut failed = vec![false; n];
    for (i, _) in &failures {
        failed[*i as usize] = true;
    }
    let keep: Vec<usize> = (0..m).filter(|j| !failed[o.sources[*j] as usize]).collect();
    Ok(TransformOutcome {
        records: records.select(keep.iter().copied()),
        sources: keep.iter().map(|j| o.sources[*j]).collect(),
        topics: keep.iter().map(|j| topics[*j].clone()).collect(),
        failures,
    })
}

/// Plugins run in order over each batch: filters drop records, transforms replace them with
/// their outputs; each step sees what the step before it passed on.
///
/// Filters never re-encode: a filter that keeps everything passes the same batch on, and
/// what filters keep is selected from the input only when a later step needs it.
#[derive(Debug)]
pub struct Chain {
    steps: Vec<Instance>,
}

/// What a chain did with a batch.
#[derive(Clone, Debug)]
pub struct ChainOutcome {
    /// For each output record, the index of the input record it came from (non-decreasing).
    pub kept: Vec<usize>,
    /// The output records when a transform made them; `None` when every step was a filter,
    /// so the output is the input records at `kept`.
    pub output: Option<ColumnarBatch>,
    /// Output topic of each output record when a transform named one; empty when none did.
    pub topics: Vec<Option<String>>,
    /// Records a step could not handle: (input index, step, reason).
    pub failures: Vec<(usize, usize, String)>,
}

impl ChainOutcome {
    /// Output record `j` (from `input`, the batch the chain ran over).
    pub fn record(&self, input: &ColumnarBatch, j: usize) -> PluginRecord {
        match &self.output {
            Some(o) => o.record(j),
            None => input.record(self.kept[j]),
        }
    }

    /// Output record `j`, borrowed from the output or from `input`.
    pub fn view<'a>(&'a self, input: &'a ColumnarBatch, j: usize) -> RecordView<'a> {
        match &self.output {
            Some(o) => o.view(j),
            None => input.view(self.kept[j]),
        }
    }
}

impl Chain {
    /// A chain of instances (filters and transforms, in order).
    pub fn new(steps: Vec<Instance>) -> Result<Self, PluginError> {
        if steps.is_empty() {
            return Err(PluginError::Invalid(
                "a chain needs at least one step".into(),
            ));
        }
        Ok(Self { steps })
    }

    /// The instances, in order.
    pub fn steps(&self) -> &[Instance] {
        &self.steps
    }

    /// Takes every step's logs since the last take: (step, report) for steps that logged.
    pub fn take_reports(&mut self) -> Vec<(usize, CallReport)> {
        self.steps
            .iter_mut()
            .enumerate()
            .map(|(i, s)| (i, s.take_report()))
            .filter(|(_, r)| !r.logs.is_empty() || r.logs_dropped > 0)
            .collect()
    }

    /// Replaces step `i` by an instance of `plugin` with `config`, at a batch boundary: the
    /// new instance takes over the old one's keyed state. If the new version cannot start,
    /// the old version is started again with the state and the error is returned; if even
    /// that fails, the chain is left without the step and must not be used (`Err` with
    /// `broken = true`).
    pub fn replace_step(
        &mut self,
        i: usize,
        plugin: &Plugin,
        config: Vec<(String, String)>,
    ) -> Result<(), (PluginError, bool)> {
        let old = self.steps.remove(i);
        let old_plugin = old.plugin.clone();
        let old_config = old.config.clone();
        let state = old.into_state();
        match plugin.instantiate(config, state) {
            Ok(new) => {
                self.steps.insert(i, new);
                Ok(())
            }
            Err(Refused { error, state }) => match old_plugin.instantiate(old_config, state) {
                Ok(back) => {
                    self.steps.insert(i, back);
                    Err((error, false))
                }
                Err(_) => Err((error, true)),
            },
        }
    }

    /// Runs `batch` through every step. A step sees only what the steps before it passed on;
    /// when a filter keeps everything the same batch goes on to the next step untouched.
    /// An error names the step that failed.
    pub fn run(&mut self, batch: &ColumnarBatch) -> Result<ChainOutcome, (usize, PluginError)> {
        let mut current: Option<ColumnarBatch> = None;
        let mut made_by_transform = false;
        let mut index: Vec<usize> = (0..batch.len()).collect();
        let mut topics: Vec<Option<String>> = Vec::new();
        let mut failures = Vec::new();
        for (step, instance) in self.steps.iter_mut().enumerate() {
            if index.is_empty() {
                break;
            }
            let input = current.as_ref().unwrap_or(batch);
            match instance.plugin.kind() {
                PluginKind::Filter => {
                    let outcome = instance.filter(input).map_err(|e| (step, e))?;
                    for (i, reason) in &outcome.failures {
                        failures.push((index[*i as usize], step, reason.clone()));
                    }
                    if outcome.keep.iter().all(|k| *k) {
                        continue;
                    }
                    let kept: Vec<usize> = outcome.kept().collect();
                    current = Some(input.select(kept.iter().copied()));
                    if !topics.is_empty() {
                        topics = kept.iter().map(|i| topics[*i].clone()).collect();
                    }
                    index = kept.iter().map(|i| index[*i]).collect();
                }
                PluginKind::Transform => {
                    let outcome = instance.transform(input).map_err(|e| (step, e))?;
                    for (i, reason) in &outcome.failures {
                        failures.push((index[*i as usize], step, reason.clone()));
                    }
                    index = outcome.sources.iter().map(|s| index[*s as usize]).collect();
                    // A later transform's topic wins; otherwise an earlier one's carries on.
                    let earlier = std::mem::take(&mut topics);
                    topics = outcome
                        .topics
                        .into_iter()
                        .zip(&outcome.sources)
                        .map(|(t, s)| t.or_else(|| earlier.get(*s as usize).cloned().flatten()))
                        .collect();
                    // Outputs carry their source record's offset and a later step sees it.
                    let mut records = outcome.records;
                    for (o, src) in records.inner.offsets.iter_mut().zip(&outcome.sources) {
                        *o = input.inner.offsets[*src as usize];
                    }
                    current = Some(records);
                    made_by_transform = true;
                }
            }
        }
        failures.sort_by_key(|f| f.0);
        if topics.iter().all(Option::is_none) {
            topics.clear();
        }
        Ok(ChainOutcome {
            kept: index,
            output: if made_by_transform { current } else { None },
            topics,
            failures,
        })
    }
}
