//! Precompiled components on disk, keyed by the component's sha256 and the engine's
//! compatibility hash, so a node compiles a component once and later loads it in well under a
//! millisecond.
//!
//! Files: `<sha256>-<engine>.cwasm` and beside it `<sha256>-<engine>.cwasm.sha256` holding the
//! sha256 of the artifact itself. An artifact is loaded only if that checksum matches the bytes
//! read (a torn or corrupted file is recompiled, never loaded), and only from the node's own
//! cache directory: precompiled code is trusted machine code, so it is never accepted from
//! users. Loading deserializes the bytes that were checked, not the file again.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn engine_key(engine: &Engine) -> String {
    // Stable for a given wasmtime build and configuration; a different key only costs a
    // recompile (and wasmtime refuses incompatible artifacts on its own as well).
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Where the artifact of the component with `sha256` lives.
fn artifact_path(dir: &Path, engine: &Engine, sha256: &str) -> PathBuf {
    dir.join(format!("{sha256}-{}.cwasm", engine_key(engine)))
}

/// How a component was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from a precompiled artifact.
    Hit,
    /// Compiled, and the artifact written for next time.
    Compiled,
    /// Compiled without a cache directory.
    Uncached,
}

/// The component for `wasm` (whose sha256 is `sha256`): from `dir` when a valid artifact is
/// there, else compiled and stored.
pub(crate) fn load_or_compile(
    engine: &Engine,
    dir: Option<&Path>,
    wasm: &[u8],
    sha256: &str,
) -> Result<(Component, CacheOutcome), String> {
    let Some(dir) = dir else {
        return Component::new(engine, wasm)
            .map(|c| (c, CacheOutcome::Uncached))
            .map_err(|e| format!("compile: {e:#}"));
    };
    let path = artifact_path(dir, engine, sha256);
    let sum_path = path.with_extension("cwasm.sha256");
    // The checked bytes are the ones loaded (never the file again, which could have changed
    // in between).
    if let (Ok(artifact), Ok(sum)) = (std::fs::read(&path), std::fs::read_to_string(&sum_path))
        && sha256_hex(&artifact) == sum.trim()
    {
        match deserialize(engine, &artifact) {
            Ok(c) => return Ok((c, CacheOutcome::Hit)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached artifact refused; recompiling")
            }
        }
    }
    let artifact = engine
        .precompile_component(wasm)
        .map_err(|e| format!("compile: {e:#}"))?;
    // The checksum goes first: a crash between the two writes leaves an artifact without a
    // matching checksum, which is recompiled, never loaded.
    write_atomically(dir, &sum_path, sha256_hex(&artifact).as_bytes())
        .and_then(|()| write_atomically(dir, &path, &artifact))
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    let component = deserialize(engine, &artifact)?;
    Ok((component, CacheOutcome::Compiled))
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, artifact: &[u8]) -> Result<Component, String> {
    // SAFETY: `deserialize` trusts the bytes to be an artifact produced by
    // `precompile_component` of a compatible engine. They are either what this engine just
    // produced, or the contents of a file in the node's own cache directory (which only this
    // module writes) whose checksum, written beside it, matched these very bytes; wasmtime
    // itself rejects artifacts from an engine with another configuration or version.
    unsafe { Component::deserialize(engine, artifact) }.map_err(|e| format!("load: {e:#}"))
}

/// Writes `path` through a temporary file unique to this process, thread and call, so
/// concurrent loads of one component never share a half-written file.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{unique}", std::process::id()));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
