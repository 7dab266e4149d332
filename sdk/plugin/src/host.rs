//! Host services: structured logs, metrics and keyed state. Each call crosses into the node.

#[cfg(feature = "filter")]
use crate::filter_world::quiver::plugin as api;
#[cfg(all(feature = "transform", not(feature = "filter")))]
use crate::transform_world::quiver::plugin as api;

/// Log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something failed.
    Error,
}

/// Writes a structured log line: `message` with `fields` (name, value pairs) at `level`. The
/// node bounds how much a plugin may log per batch and counts what it drops.
#[cfg(any(feature = "filter", feature = "transform"))]
pub fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
    use api::log::Level as L;
    let level = match level {
        Level::Trace => L::Trace,
        Level::Debug => L::Debug,
        Level::Info => L::Info,
        Level::Warn => L::Warn,
        Level::Error => L::Error,
    };
    let fields: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    api::log::log(level, message, &fields);
}

/// Without a world there is no host to log to (a build for tests of plain logic).
#[cfg(not(any(feature = "filter", feature = "transform")))]
pub fn log(_level: Level, _message: &str, _fields: &[(&str, &str)]) {}

/// Metrics by name, shown by `quiver plugin describe`.
pub mod metrics {
    #[cfg(any(feature = "filter", feature = "transform"))]
    use super::api::metrics as m;

    /// Adds `delta` to counter `name`.
    pub fn counter_add(name: &str, delta: u64) {
        #[cfg(any(feature = "filter", feature = "transform"))]
        m::counter_add(name, delta);
        #[cfg(not(any(feature = "filter", feature = "transform")))]
        let _ = (name, delta);
    }

    /// Sets gauge `name`.
    pub fn gauge_set(name: &str, value: f64) {
        #[cfg(any(feature = "filter", feature = "transform"))]
        m::gauge_set(name, value);
        #[cfg(not(any(feature = "filter", feature = "transform")))]
        let _ = (name, value);
    }

    /// Records one observation in histogram `name`.
    pub fn histogram_record(name: &str, value: f64) {
        #[cfg(any(feature = "filter", feature = "transform"))]
        m::histogram_record(name, value);
        #[cfg(not(any(feature = "filter", feature = "transform")))]
        let _ = (name, value);
    }
}

/// Keyed state private to this plugin instance and partition; it outlives the instance
/// (restarts, version swaps).
pub mod state {
    #[cfg(any(feature = "filter", feature = "transform"))]
    use super::api::state as s;

    /// The value under `key`.
    pub fn get(key: &[u8]) -> Option<Vec<u8>> {
        #[cfg(any(feature = "filter", feature = "transform"))]
        return s::get(key);
        #[cfg(not(any(feature = "filter", feature = "transform")))]
        {
            let _ = key;
            None
        }
    }

    /// Stores `value` under `key`; fails when the node's state limits would be exceeded.
    pub fn put(key: &[u8], value: &[u8]) -> Result<(), String> {
        #[cfg(any(feature = "filter", feature = "transform"))]
        return s::put(key, value);
        #[cfg(not(any(feature = "filter", feature = "transform")))]
        {
            let _ = (key, value);
            Err("no host".into())
        }
    }

    /// Removes `key`.
    pub fn delete(key: &[u8]) {
        #[cfg(any(feature = "filter", feature = "transform"))]
        s::delete(key);
        #[cfg(not(any(feature = "filter", feature = "transform")))]
        let _ = key;
    }
}
