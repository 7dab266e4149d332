//! Misbehaving guest: allocates without bound in `filter`. The host's memory cap must stop it.

use quiver_plugin::{Config, Filter, Record, Verdict};

struct Hog(Vec<Vec<u8>>);

impl Filter for Hog {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Hog(Vec::new()))
    }

    fn filter(&mut self, _: &Record<'_>) -> Verdict {
        loop {
            // Touch every page so the memory is really committed.
            self.0.push(vec![0xAB; 1 << 20]);
        }
    }
}

quiver_plugin::export_filter!(Hog);
