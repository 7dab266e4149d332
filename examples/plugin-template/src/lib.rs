//! A filter plugin to start from: keeps records whose JSON value has a `level` field at or
//! above the `min-level` parameter (`debug` < `info` < `warn` < `error`), counts what it sees,
//! and fails records that are not JSON (the attachment's error policy decides what then
//! happens to them).

use quiver_plugin::json::{self, FieldPath};
use quiver_plugin::{Config, Filter, Record, Verdict, metrics};

const LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

struct MinLevel {
    field: FieldPath,
    min: usize,
}

fn rank(level: &str) -> Option<usize> {
    LEVELS.iter().position(|l| *l == level)
}

impl Filter for MinLevel {
    fn init(config: &Config) -> Result<Self, String> {
        let min = config.get("min-level").unwrap_or("info");
        let min = rank(min).ok_or(format!("min-level must be one of {LEVELS:?}, not {min:?}"))?;
        let field = FieldPath::parse(config.get("field").unwrap_or("level"))?;
        Ok(Self { field, min })
    }

    fn filter(&mut self, record: &Record<'_>) -> Verdict {
        metrics::counter_add("seen", 1);
        let doc = match json::parse(record.value) {
            Ok(doc) => doc,
            Err(e) => return Verdict::Fail(e),
        };
        let level = self.field.get(&doc).map(json::as_text);
        Verdict::keep_if(level.and_then(|l| rank(&l)).is_some_and(|r| r >= self.min))
    }
}

quiver_plugin::export_filter!(MinLevel);
