//! What a guest may reach on the host: its logs, metrics and keyed state, a WASI context
//! with no capabilities (no files, network or environment; stdout and stderr captured into
//! bounded buffers), and a memory limiter that records when the guest hit its cap.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::filter::quiver::plugin::{log, metrics, state, types};

/// Keyed state of one plugin instance on one partition. The broker backs it with its
/// durable store; [`MemoryState`] keeps it in memory.
pub trait StateStore: Send + std::fmt::Debug {
    /// The value under `key`.
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    /// Stores `value` under `key`, or says why not (a limit).
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String>;
    /// Removes `key`.
    fn delete(&mut self, key: &[u8]);
}

/// State in memory, bounded in bytes (keys plus values).
#[derive(Debug)]
pub struct MemoryState {
    entries: HashMap<Vec<u8>, Vec<u8>>,
    bytes: usize,
    bytes_max: usize,
}

impl MemoryState {
    /// Empty state holding at most `bytes_max` bytes of keys and values.
    pub fn new(bytes_max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            bytes: 0,
            bytes_max,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl StateStore for MemoryState {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.entries.get(key).cloned()
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let old = self.entries.get(key).map_or(0, |v| key.len() + v.len());
        let new = self.bytes - old + key.len() + value.len();
        if new > self.bytes_max {
            return Err(format!(
                "state would hold {new} bytes, more than its limit of {}",
                self.bytes_max
            ));
        }
        self.bytes = new;
        self.entries.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) {
        if let Some(v) = self.entries.remove(key) {
            self.bytes -= key.len() + v.len();
        }
    }
}

/// Level of a guest log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// Where a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSource {
    /// The `log` import.
    Log,
    /// The guest's stdout.
    Stdout,
    /// The guest's stderr.
    Stderr,
}

/// One line a guest logged or printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Level (stdout is info, stderr is warn).
    pub level: LogLevel,
    /// Which channel.
    pub source: LogSource,
    /// The message, truncated to the line limit.
    pub message: String,
    /// Structured fields.
    pub fields: Vec<(String, String)>,
}

/// A named metric a guest reports.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricValue {
    /// A counter.
    Counter(u64),
    /// A gauge's last value.
    Gauge(f64),
    /// A histogram's summary.
    Histogram {
        /// Observations.
        count: u64,
        /// Sum of observations.
        sum: f64,
        /// Smallest.
        min: f64,
        /// Largest.
        max: f64,
    },
}

/// Limits on what a guest may leave on the host per call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostLimits {
    pub(crate) memory_bytes_max: usize,
    pub(crate) log_lines_per_call_max: usize,
    pub(crate) log_line_bytes_max: usize,
    pub(crate) log_bytes_per_call_max: usize,
    pub(crate) output_bytes_per_call_max: usize,
    pub(crate) metrics_max: usize,
}

/// Bytes a guest wrote to stdout or stderr, bounded; the excess is counted and dropped, never
/// an error (a guest that prints too much must not fail because of it).
#[derive(Clone, Debug, Default)]
pub(crate) struct Capture(Arc<Mutex<Captured>>);

#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped_bytes: u64,
    bytes_max: usize,
}

impl Capture {
    pub(crate) fn new(bytes_max: usize) -> Self {
        Self(Arc::new(Mutex::new(Captured {
            bytes: Vec::new(),
            dropped_bytes: 0,
            bytes_max,
        })))
    }

    fn write(&self, data: &[u8]) {
        if let Ok(mut c) = self.0.lock() {
            let room = c.bytes_max.saturating_sub(c.bytes.len());
            let keep = data.len().min(room);
            c.bytes.extend_from_slice(&data[..keep]);
            c.dropped_bytes += (data.len() - keep) as u64;
        }
    }

    /// Takes what was written since the last call, and how many bytes were dropped.
    pub(crate) fn take(&self) -> (Vec<u8>, u64) {
        match self.0.lock() {
            Ok(mut c) => {
                let dropped = std::mem::take(&mut c.dropped_bytes);
                (std::mem::take(&mut c.bytes), dropped)
            }
            Err(_) => (Vec::new(), 0),
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        Capture::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always ready: what does not fit is dropped and counted.
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Capture::write(&self, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// The data of one instance's store.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: HostLimits,
    /// Set when the guest asked for more memory than its cap.
    pub(crate) memory_refused: bool,
    pub(crate) logs: Vec<LogLine>,
    /// Bytes of messages and fields kept in `logs` this call.
    pub(crate) log_bytes: usize,
    pub(crate) logs_dropped: u64,
    /// Bytes of all linear memories of the instance (the cap covers their sum).
    memory_bytes: usize,
    pub(crate) metrics: BTreeMap<String, MetricValue>,
    pub(crate) state: Box<dyn StateStore>,
    pub(crate) stdout: Capture,
    pub(crate) stderr: Capture,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("limits", &self.limits)
            .field("logs", &self.logs.len())
            .finish_non_exhaustive()
    }
}

impl HostState {
    pub(crate) fn new(limits: HostLimits, state: Box<dyn StateStore>) -> Self {
        let stdout = Capture::new(limits.output_bytes_per_call_max);
        let stderr = Capture::new(limits.output_bytes_per_call_max);
        // No capability: no preopened directories, no environment or arguments, no network
        // (WASI denies sockets and name lookups unless allowed), stdin closed.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limits,
            memory_refused: false,
            logs: Vec::new(),
            log_bytes: 0,
            logs_dropped: 0,
            memory_bytes: 0,
            metrics: BTreeMap::new(),
            state,
            stdout,
            stderr,
        }
    }

    fn push_log(&mut self, line: LogLine) {
        let bytes = line.message.len()
            + line
                .fields
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if self.logs.len() >= self.limits.log_lines_per_call_max
            || self.log_bytes + bytes > self.limits.log_bytes_per_call_max
        {
            self.logs_dropped += 1;
            return;
        }
        self.log_bytes += bytes;
        self.logs.push(line);
    }

    /// Turns captured stdout/stderr into log lines (bounded like `log` calls).
    pub(crate) fn drain_output(&mut self) {
        for (capture, source, level) in [
            (self.stdout.clone(), LogSource::Stdout, LogLevel::Info),
            (self.stderr.clone(), LogSource::Stderr, LogLevel::Warn),
        ] {
            let (bytes, dropped) = capture.take();
            if dropped > 0 {
                self.logs_dropped += 1;
            }
            for line in String::from_utf8_lossy(&bytes).lines() {
                let message = truncate(line, self.limits.log_line_bytes_max);
                self.push_log(LogLine {
                    level,
                    source,
                    message,
                    fields: Vec::new(),
                });
            }
        }
    }

    fn metric(&mut self, name: String, f: impl FnOnce(&mut Option<MetricValue>)) {
        if !self.metrics.contains_key(&name) && self.metrics.len() >= self.limits.metrics_max {
            return;
        }
        let mut slot = self.metrics.remove(&name);
        f(&mut slot);
        if let Some(v) = slot {
            self.metrics.insert(name, v);
        }
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime::ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The cap covers all memories of the instance together.
        let total = self
            .memory_bytes
            .saturating_add(desired.saturating_sub(current));
        if total > self.limits.memory_bytes_max {
            self.memory_refused = true;
            return Ok(false);
        }
        self.memory_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        8
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) {
        let level = match level {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        let max = self.limits.log_line_bytes_max;
        let fields = fields
            .into_iter()
            .take(32)
            .map(|(k, v)| (truncate(&k, 128), truncate(&v, max)))
            .collect();
        self.push_log(LogLine {
            level,
            source: LogSource::Log,
            message: truncate(&message, max),
            fields,
        });
    }
}

impl metrics::Host for HostState {
    fn counter_add(&mut self, name: String, delta: u64) {
        self.metric(truncate(&name, 128), |m| match m {
            Some(MetricValue::Counter(c)) => *c = c.saturating_add(delta),
            other => *other = Some(MetricValue::Counter(delta)),
        });
    }

    fn gauge_set(&mut self, name: String, value: f64) {
        self.metric(truncate(&name, 128), |m| {
            *m = Some(MetricValue::Gauge(value))
        });
    }

    fn histogram_record(&mut self, name: String, value: f64) {
        self.metric(truncate(&name, 128), |m| match m {
            Some(MetricValue::Histogram {
                count,
                sum,
                min,
                max,
            }) => {
                *count += 1;
                *sum += value;
                *min = min.min(value);
                *max = max.max(value);
            }
            other => {
                *other = Some(MetricValue::Histogram {
                    count: 1,
                    sum: value,
                    min: value,
                    max: value,
                })
            }
        });
    }
}

impl state::Host for HostState {
    fn get(&mut self, key: Vec<u8>) -> Option<Vec<u8>> {
        self.state.get(&key)
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        self.state.put(&key, &value)
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.state.delete(&key)
    }
}
