//! Misbehaving guest: never returns from `filter`. The host's deadline must stop it.

use quiver_plugin::{Config, Filter, Record, Verdict};

struct Spin;

impl Filter for Spin {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Spin)
    }

    fn filter(&mut self, record: &Record<'_>) -> Verdict {
        let mut x = record.offset;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

quiver_plugin::export_filter!(Spin);
