//! The plugin registry: which Wasm components are deployed under which `name@version`.
//!
//! Components are stored content-addressed, `DATA_DIR/plugins/<sha256>.wasm` (written to a
//! temporary file, fsynced, renamed, directory fsynced), and their entries in the catalog's
//! sled database (tree `plugins`, key `name@version`), flushed before a deploy or remove is
//! acknowledged. A version is immutable: deploying different bytes under an existing
//! `name@version` is refused, deploying the same bytes again is a no-op. Every component is
//! compiled and checked against the WIT worlds by the runtime before it is accepted;
//! precompiled artifacts are cached in `DATA_DIR/plugins/cache`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use quiver_proto::ErrorCode;
use quiver_proto::messages::{ChainStep, PluginInfo};
use quiver_runtime::{CallReport, InstanceStats, Plugin, Runtime, RuntimeConfig, sha256_hex};

/// The internal topic guest logs go to (one partition; key `name@version`, value one JSON
/// object per line).
pub const PLUGIN_LOGS_TOPIC: &str = "__plugin_logs";

/// Guest log lines waiting to be written; beyond this, lines are dropped (and counted).
pub const LOG_QUEUE_LINES_MAX: usize = 10_000;

/// One guest log line, with where it came from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LogEntry {
    /// When the node shipped it, ms since the Unix epoch.
    pub ts_ms: i64,
    /// `name@version`.
    pub plugin: String,
    /// Where the instance runs: `fetch TOPIC/P`, `produce TOPIC/P` or `pipeline NAME TOPIC/P`.
    pub context: String,
    /// `trace` .. `error`.
    pub level: String,
    /// `log` (the host import), `stdout` or `stderr`.
    pub source: String,
    /// The message.
    pub message: String,
    /// Structured fields, in order.
    pub fields: Vec<(String, String)>,
}

use crate::catalog::Catalog;

/// A registry failure, as a protocol code and a message.
pub type RegistryError = (ErrorCode, String);

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    kind: String,
    sha256: String,
    bytes: u64,
    deployed_ms: i64,
}

/// Deployed plugins.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    catalog: Catalog,
    tree: sled::Tree,
    runtime: Runtime,
    /// Serialises deploys and removes so an entry and its file change together.
    admin: tokio::sync::Mutex<()>,
    /// Compiled components by sha256.
    loaded: Mutex<HashMap<String, Plugin>>,
    /// Running instances per `name@version` (fetch chains, policies, pipelines).
    attached: Arc<Mutex<HashMap<String, usize>>>,
    /// What every version did since the node started, by `name@version`.
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    logs: tokio::sync::mpsc::Sender<LogEntry>,
    logs_rx: Mutex<Option<tokio::sync::mpsc::Receiver<LogEntry>>>,
    /// Lines dropped because the queue was full, or by the runtime's per-call limits.
    logs_dropped: AtomicU64,
}

/// Work done by one plugin version, summed over its instances.
#[derive(Debug, Default)]
pub struct Counters {
    batches: AtomicU64,
    records_in: AtomicU64,
    records_out: AtomicU64,
    records_dropped: AtomicU64,
    records_failed: AtomicU64,
    errors: AtomicU64,
    guest_us: AtomicU64,
}

impl Counters {
    /// Adds what an instance did between two snapshots of its stats.
    pub fn add(&self, before: &InstanceStats, after: &InstanceStats) {
        let add = |c: &AtomicU64, a: u64, b: u64| {
            c.fetch_add(b.saturating_sub(a), Ordering::Relaxed);
        };
        add(&self.batches, before.batches, after.batches);
        add(&self.records_in, before.records_in, after.records_in);
        add(&self.records_out, before.records_out, after.records_out);
        add(
            &self.records_dropped,
            before.records_dropped,
            after.records_dropped,
        );
        add(
            &self.records_failed,
            before.records_failed,
            after.records_failed,
        );
        add(&self.errors, before.errors, after.errors);
        add(&self.guest_us, before.guest_us, after.guest_us);
    }

    fn fill(&self, info: &mut PluginInfo) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        info.batches = get(&self.batches);
        info.records_in = get(&self.records_in);
        info.records_out = get(&self.records_out);
        info.records_dropped = get(&self.records_dropped);
        info.records_failed = get(&self.records_failed);
        info.errors = get(&self.errors);
        info.guest_us = get(&self.guest_us);
    }
}

/// A deployed version resolved for running.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// `name@version`.
    pub key: String,
    /// The compiled component.
    pub plugin: Plugin,
}

/// Holds `name@version` attached while alive: it cannot be removed meanwhile.
#[derive(Debug)]
pub struct Attached {
    key: String,
    map: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

fn storage(e: impl std::fmt::Display) -> RegistryError {
    (ErrorCode::StorageError, e.to_string())
}

/// Checks a plugin name: 1–64 bytes of `[a-z0-9_-]`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "plugin name {name:?} must be 1-64 bytes of [a-z0-9_-], starting with a letter or digit"
        ))
    }
}

/// Checks a version: semantic versioning without build metadata.
pub fn check_version(version: &str) -> Result<semver::Version, String> {
    let v = semver::Version::parse(version)
        .map_err(|e| format!("version {version:?} is not a semantic version: {e}"))?;
    if !v.build.is_empty() {
        return Err(format!(
            "version {version:?}: build metadata (+...) is not allowed"
        ));
    }
    Ok(v)
}

impl Registry {
    /// Opens the registry in `data_dir`, with its own Wasm runtime.
    pub fn open(data_dir: &Path, catalog: &Catalog) -> anyhow::Result<Self> {
        let dir = data_dir.join("plugins");
        std::fs::create_dir_all(&dir)?;
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(dir.join("cache")),
            ..RuntimeConfig::default()
        })
        .map_err(|e| anyhow::anyhow!("wasm runtime: {e}"))?;
        let (logs, logs_rx) = tokio::sync::mpsc::channel(LOG_QUEUE_LINES_MAX);
        Ok(Self {
            dir,
            catalog: catalog.clone(),
            tree: catalog.tree("plugins")?,
            runtime,
            admin: tokio::sync::Mutex::new(()),
            loaded: Mutex::new(HashMap::new()),
            attached: Arc::new(Mutex::new(HashMap::new())),
            counters: Mutex::new(HashMap::new()),
            logs,
            logs_rx: Mutex::new(Some(logs_rx)),
            logs_dropped: AtomicU64::new(0),
        })
    }

    /// Queues what an instance logged for the log topic (never blocks; a full queue drops).
    pub fn ship_logs(&self, plugin: &str, context: &str, report: CallReport) {
        self.logs_dropped
            .fetch_add(report.logs_dropped, Ordering::Relaxed);
        let ts_ms = crate::now_ms();
        for line in report.logs {
            let entry = LogEntry {
                ts_ms,
                plugin: plugin.to_string(),
                context: context.to_string(),
                level: format!("{:?}", line.level).to_lowercase(),
                source: format!("{:?}", line.source).to_lowercase(),
                message: line.message,
                fields: line.fields,
            };
            if self.logs.try_send(entry).is_err() {
                self.logs_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The queue's receiving end, once (for the task that writes the log topic).
    pub fn take_log_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<LogEntry>> {
        self.logs_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Guest log lines dropped since the node started.
    pub fn logs_dropped(&self) -> u64 {
        self.logs_dropped.load(Ordering::Relaxed)
    }

    /// The version a chain step names, checked deployed: the step's own, or the highest
    /// deployed when it names none. Does not load the component.
    pub fn deployed_version(&self, step: &ChainStep) -> Result<String, RegistryError> {
        if step.version.is_empty() {
            return match self.list(&step.plugin)?.pop() {
                Some(p) => Ok(p.version),
                None => Err((
                    ErrorCode::PluginNotFound,
                    format!("no plugin {} is deployed", step.plugin),
                )),
            };
        }
        let key = format!("{}@{}", step.plugin, step.version);
        match self.entry(&key)? {
            Some(_) => Ok(step.version.clone()),
            None => Err((ErrorCode::PluginNotFound, format!("no plugin {key}"))),
        }
    }

    /// Finds the version a chain step names (the highest deployed when it names none) and
    /// its compiled component. Blocking: the first use of a component loads it from disk.
    pub fn resolve(&self, step: &ChainStep) -> Result<Resolved, RegistryError> {
        let version = self.deployed_version(step)?;
        let key = format!("{}@{version}", step.plugin);
        let Some(entry) = self.entry(&key)? else {
            return Err((ErrorCode::PluginNotFound, format!("no plugin {key}")));
        };
        if let Some(p) = self.lock_loaded().get(&entry.sha256) {
            return Ok(Resolved {
                key,
                plugin: p.clone(),
            });
        }
        let wasm = std::fs::read(self.component_path(&entry.sha256)).map_err(storage)?;
        let plugin = self
            .runtime
            .load(&wasm)
            .map_err(|e| (ErrorCode::InvalidPlugin, format!("{key}: {e}")))?;
        self.lock_loaded()
            .insert(entry.sha256.clone(), plugin.clone());
        Ok(Resolved { key, plugin })
    }

    fn lock_loaded(&self) -> std::sync::MutexGuard<'_, HashMap<String, Plugin>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `key` (`name@version`) in use until the guard drops.
    pub fn attach(&self, key: &str) -> Attached {
        *self
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default() += 1;
        Attached {
            key: key.to_string(),
            map: self.attached.clone(),
        }
    }

    /// Running instances of `key`.
    pub fn attached_count(&self, key: &str) -> usize {
        self.attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// The counters of `key`, created on first use.
    pub fn counters(&self, key: &str) -> Arc<Counters> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// The runtime plugins run in.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    fn component_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.wasm"))
    }

    fn info(&self, name: &str, version: &str, e: &Entry) -> PluginInfo {
        let key = format!("{name}@{version}");
        let mut info = PluginInfo {
            name: name.to_string(),
            version: version.to_string(),
            kind: e.kind.clone(),
            sha256: e.sha256.clone(),
            bytes: e.bytes,
            deployed_ms: e.deployed_ms,
            attached: self.attached_count(&key) as u32,
            ..PluginInfo::default()
        };
        if let Some(c) = self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            c.fill(&mut info);
        }
        info
    }

    fn entry(&self, key: &str) -> Result<Option<Entry>, RegistryError> {
        match self.tree.get(key).map_err(storage)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| storage(format!("registry entry {key}: {e}"))),
        }
    }

    /// Deploys `component` as `name@version`; `Ok(true, ..)` when stored now, `Ok(false, ..)`
    /// when the same bytes were already there.
    pub async fn deploy(
        &self,
        name: &str,
        version: &str,
        component: Bytes,
    ) -> Result<(bool, PluginInfo), RegistryError> {
        let invalid = |m: String| (ErrorCode::InvalidRequest, m);
        check_name(name).map_err(invalid)?;
        check_version(version).map_err(invalid)?;
        let key = format!("{name}@{version}");
        let _admin = self.admin.lock().await;
        let sha256 = sha256_hex(&component);
        if let Some(existing) = self.entry(&key)? {
            if existing.sha256 == sha256 {
                return Ok((false, self.info(name, version, &existing)));
            }
            return Err((
                ErrorCode::PluginExists,
                format!(
                    "{key} is deployed with other bytes (sha256 {}); versions are immutable, deploy a new version",
                    existing.sha256
                ),
            ));
        }
        // Compiling takes from milliseconds to seconds: off the async threads.
        let (runtime, wasm) = (self.runtime.clone(), component.clone());
        let plugin = tokio::task::spawn_blocking(move || runtime.load(&wasm))
            .await
            .map_err(storage)?
            .map_err(|e| (ErrorCode::InvalidPlugin, e.to_string()))?;
        let path = self.component_path(&sha256);
        if !path.exists() {
            let (dir, path, bytes) = (self.dir.clone(), path.clone(), component.clone());
            tokio::task::spawn_blocking(move || write_durably(&dir, &path, &bytes))
                .await
                .map_err(storage)?
                .map_err(storage)?;
        }
        let entry = Entry {
            kind: plugin.kind().to_string(),
            sha256,
            bytes: component.len() as u64,
            deployed_ms: crate::now_ms(),
        };
        let value = serde_json::to_vec(&entry).map_err(storage)?;
        self.tree.insert(key.as_bytes(), value).map_err(storage)?;
        self.catalog.flush().map_err(storage)?;
        tracing::info!(plugin = %key, kind = %entry.kind, sha256 = %entry.sha256, "plugin deployed");
        Ok((true, self.info(name, version, &entry)))
    }

    /// Every version of `name` (every plugin when empty), by name then semantic version.
    pub fn list(&self, name: &str) -> Result<Vec<PluginInfo>, RegistryError> {
        let mut out = Vec::new();
        let prefix = if name.is_empty() {
            String::new()
        } else {
            format!("{name}@")
        };
        for item in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(storage)?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let Some((n, ver)) = key.split_once('@') else {
                continue;
            };
            let e: Entry = serde_json::from_slice(&v)
                .map_err(|e| storage(format!("registry entry {key}: {e}")))?;
            out.push(self.info(n, ver, &e));
        }
        out.sort_by(|a, b| {
            a.name.cmp(&b.name).then_with(|| {
                match (
                    semver::Version::parse(&a.version),
                    semver::Version::parse(&b.version),
                ) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => a.version.cmp(&b.version),
                }
            })
        });
        Ok(out)
    }

    /// Removes `name@version`, and its component file once no version uses it.
    pub async fn remove(&self, name: &str, version: &str) -> Result<(), RegistryError> {
        let key = format!("{name}@{version}");
        let _admin = self.admin.lock().await;
        let Some(entry) = self.entry(&key)? else {
            return Err((ErrorCode::PluginNotFound, format!("no plugin {key}")));
        };
        let running = self.attached_count(&key);
        if running > 0 {
            return Err((
                ErrorCode::PluginInUse,
                format!("{key} is attached ({running} running instances); detach it first"),
            ));
        }
        self.tree.remove(key.as_bytes()).map_err(storage)?;
        self.catalog.flush().map_err(storage)?;
        let still_used = self.list("")?.iter().any(|p| p.sha256 == entry.sha256);
        if !still_used {
            let path = self.component_path(&entry.sha256);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete an unused component");
            }
        }
        tracing::info!(plugin = %key, "plugin removed");
        Ok(())
    }
}

fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("wasm.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes queued guest log lines to [`PLUGIN_LOGS_TOPIC`] until the queue closes, creating
/// the topic (one partition, 256 MiB and 7 days of retention) when a line first needs it.
/// Lines are appended in batches of up to 1,000; a failed append is reported in the node's
/// log and its lines are dropped (guest logs never hold up the data path).
pub async fn write_logs(
    broker: Arc<crate::broker::Broker>,
    mut rx: tokio::sync::mpsc::Receiver<LogEntry>,
) {
    let mut buf = Vec::new();
    while rx.recv_many(&mut buf, 1_000).await > 0 {
        if broker.topic(PLUGIN_LOGS_TOPIC).is_none() {
            let settings = [
                ("retention.bytes".to_string(), (256u64 << 20).to_string()),
                (
                    "retention.ms".to_string(),
                    (7u64 * 24 * 3600 * 1000).to_string(),
                ),
            ];
            if let Err(e) = broker.create_topic(PLUGIN_LOGS_TOPIC, 1, &settings).await
                && e.code != ErrorCode::TopicAlreadyExists
            {
                tracing::warn!(error = %e, lines = buf.len(), "cannot create the plugin log topic; lines dropped");
                buf.clear();
                continue;
            }
        }
        let mut b = quiver_proto::BatchBuilder::new(quiver_proto::Compression::Lz4);
        for e in buf.drain(..) {
            let fields: serde_json::Map<String, serde_json::Value> = e
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let value = serde_json::json!({
                "ts_ms": e.ts_ms,
                "plugin": e.plugin,
                "context": e.context,
                "level": e.level,
                "source": e.source,
                "message": e.message,
                "fields": fields,
            });
            let value = value.to_string();
            b.push(
                Some(e.plugin.as_bytes()),
                Some(value.as_bytes()),
                &[],
                e.ts_ms,
            );
        }
        let stored = async {
            let part = broker.partition(PLUGIN_LOGS_TOPIC, 0)?;
            part.enqueue(vec![b.finish()]).await?.await
        };
        if let Err(e) = stored.await {
            tracing::warn!(error = %e.message, "plugin log lines could not be stored");
        }
    }
}
