//! Reference filter for the runtime's tests: keeps records whose value contains the `needle`
//! parameter, fails records whose value is `FAIL`, and uses every host service (a log line and
//! metrics per batch, a per-instance counter in keyed state). `init` without `needle` fails.

use quiver_plugin::{Config, Filter, Level, Record, Verdict, log, metrics, state};

struct Reference {
    needle: Vec<u8>,
}

impl Filter for Reference {
    fn init(config: &Config) -> Result<Self, String> {
        let needle = config.get("needle").ok_or("missing parameter: needle")?;
        log(Level::Info, "reference filter ready", &[("needle", needle)]);
        Ok(Self {
            needle: needle.as_bytes().to_vec(),
        })
    }

    fn filter(&mut self, record: &Record<'_>) -> Verdict {
        let seen = state::get(b"seen")
            .and_then(|v| v.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        if state::put(b"seen", &(seen + 1).to_le_bytes()).is_err() {
            return Verdict::Fail("state is full".into());
        }
        metrics::counter_add("records", 1);
        let value = record.value.unwrap_or_default();
        if value == b"FAIL" {
            return Verdict::Fail(format!("record at offset {} asked to fail", record.offset));
        }
        if let Some(Some(h)) = record.headers.get("mark") {
            metrics::gauge_set("last-mark-bytes", h.len() as f64);
        }
        Verdict::keep_if(
            self.needle.is_empty() || value.windows(self.needle.len()).any(|w| w == self.needle),
        )
    }
}

quiver_plugin::export_filter!(Reference);
