//! `dedupe`: drops a record whose key was seen within a window, remembering keys in keyed
//! state (so duplicates are caught across restarts). Parameters: README.md beside this crate.

use quiver_plugin::json::{self, FieldPath};
use quiver_plugin::{Config, Filter, Record, Verdict, state};

struct Dedupe {
    window_ms: i64,
    /// Dedupe on this JSON field instead of the record key.
    field: Option<FieldPath>,
}

impl Filter for Dedupe {
    fn init(config: &Config) -> Result<Self, String> {
        let window_ms: i64 = config
            .get("window-ms")
            .unwrap_or("60000")
            .parse()
            .map_err(|_| "window-ms must be an integer".to_string())?;
        if window_ms <= 0 {
            return Err("window-ms must be positive".into());
        }
        let field = config.get("field").map(FieldPath::parse).transpose()?;
        Ok(Self { window_ms, field })
    }

    fn filter(&mut self, record: &Record<'_>) -> Verdict {
        let key: Vec<u8> = match &self.field {
            None => match record.key {
                Some(k) => k.to_vec(),
                // Without a key there is nothing to compare: keep.
                None => return Verdict::Keep,
            },
            Some(f) => match json::parse(record.value) {
                Ok(doc) => match f.get(&doc) {
                    Some(v) => json::as_text(v).into_bytes(),
                    None => return Verdict::Keep,
                },
                Err(e) => return Verdict::Fail(e),
            },
        };
        // Event time: a window is measured on record timestamps, so replays dedupe the same.
        let last = state::get(&key)
            .and_then(|v| v.try_into().ok())
            .map(i64::from_le_bytes);
        if let Some(last) = last
            && record.timestamp.abs_diff(last) < self.window_ms as u64
        {
            return Verdict::Drop;
        }
        match state::put(&key, &record.timestamp.to_le_bytes()) {
            Ok(()) => Verdict::Keep,
            Err(e) => Verdict::Fail(format!("cannot remember the key: {e}")),
        }
    }
}

quiver_plugin::export_filter!(Dedupe);
