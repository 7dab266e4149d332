//! `sample`: keeps one record in N, by arrival or by key hash. Parameters: README.md.

use quiver_plugin::{Config, Filter, Record, Verdict};

enum By {
    /// The 1st, (N+1)th, (2N+1)th ... record this instance sees.
    Count(u64),
    /// Records whose key hashes (FNV-1a 64) to 0 mod N: the same keys every time.
    Key,
}

struct Sample {
    rate: u64,
    by: By,
}

/// FNV-1a, 64 bits: stable across versions and languages, so a sample by key is reproducible.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Filter for Sample {
    fn init(config: &Config) -> Result<Self, String> {
        let rate: u64 = config
            .get("rate")
            .ok_or("missing parameter: rate (keep 1 in rate)")?
            .parse()
            .map_err(|_| "rate must be a positive integer".to_string())?;
        if rate == 0 {
            return Err("rate must be at least 1".into());
        }
        let by = match config.get("by").unwrap_or("count") {
            "count" => By::Count(0),
            "key" => By::Key,
            other => return Err(format!("by must be count or key, not {other:?}")),
        };
        Ok(Self { rate, by })
    }

    fn filter(&mut self, record: &Record<'_>) -> Verdict {
        match &mut self.by {
            By::Count(seen) => {
                let keep = seen.is_multiple_of(self.rate);
                *seen += 1;
                Verdict::keep_if(keep)
            }
            // Keyless records hash as the empty key.
            By::Key => {
                Verdict::keep_if(fnv1a(record.key.unwrap_or_default()).is_multiple_of(self.rate))
            }
        }
    }
}

quiver_plugin::export_filter!(Sample);
