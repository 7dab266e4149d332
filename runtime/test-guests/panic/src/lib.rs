//! Misbehaving guest: panics on a record whose value is `boom` (a trap for the host), keeps
//! the others.

use quiver_plugin::{Config, Filter, Record, Verdict};

struct Panic;

impl Filter for Panic {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Panic)
    }

    fn filter(&mut self, record: &Record<'_>) -> Verdict {
        if record.value == Some(b"boom") {
            panic!("guest panicked at offset {}", record.offset);
        }
        Verdict::Keep
    }
}

quiver_plugin::export_filter!(Panic);
