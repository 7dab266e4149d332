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
        // State holds the timestamp and offset of the last kept record with this key. The
        // window is measured on record timestamps (event time). A record whose offset is the
        // remembered one is that same record seen again (a batch run twice after a restart,
        // whose output was not committed): it is kept again, never counted as its own
        // duplicate.
        let last = state::get(&key).and_then(|v| {
            let ts = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
            let offset = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
            Some((ts, offset))
        });
        if let Some((ts, offset)) = last {
            if offset == record.offset {
                return Verdict::Keep;
            }
            if record.timestamp.abs_diff(ts) < self.window_ms as u64 {
                return Verdict::Drop;
            }
        }
        let mut entry = record.timestamp.to_le_bytes().to_vec();
        entry.extend_from_slice(&record.offset.to_le_bytes());
        match state::put(&key, &entry) {
            Ok(()) => Verdict::Keep,
            Err(e) => Verdict::Fail(format!("cannot remember the key: {e}")),
        }
    }
}

quiver_plugin::export_filter!(Dedupe);
