//! The plugin registry: which Wasm components are deployed under which `name@version`.
//!
//! Components are stored content-addressed, `DATA_DIR/plugins/<sha256>.wasm` (written to a
//! temporary file, fsynced, renamed, directory fsynced), and their entries in the catalog's
//! sled database (tree `plugins`, key `name@version`), flushed before a deploy or remove is
//! acknowledged. A version is immutable: deploying different bytes under an existing
//! `name@version` is refused, deploying the same bytes again is a no-op. Every component is
//! compiled and checked against the WIT worlds by the runtime before it is accepted;
//! precompiled artifacts are cached in `DATA_DIR/plugins/cache`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use quiver_proto::ErrorCode;
use quiver_proto::messages::PluginInfo;
use quiver_runtime::{Runtime, RuntimeConfig, sha256_hex};

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
        Ok(Self {
            dir,
            catalog: catalog.clone(),
            tree: catalog.tree("plugins")?,
            runtime,
            admin: tokio::sync::Mutex::new(()),
        })
    }

    /// The runtime plugins run in.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    fn component_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.wasm"))
    }

    fn info(name: &str, version: &str, e: &Entry) -> PluginInfo {
        PluginInfo {
            name: name.to_string(),
            version: version.to_string(),
            kind: e.kind.clone(),
            sha256: e.sha256.clone(),
            bytes: e.bytes,
            deployed_ms: e.deployed_ms,
        }
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
                return Ok((false, Self::info(name, version, &existing)));
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
        Ok((true, Self::info(name, version, &entry)))
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
            out.push(Self::info(n, ver, &e));
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
