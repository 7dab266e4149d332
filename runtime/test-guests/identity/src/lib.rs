//! The trivial filter of the runtime benchmark: keeps every record, calls nothing on the host.
//! What it costs is the boundary crossing and the SDK's per-record view, nothing else.

use quiver_plugin::{Config, Filter, Record, Verdict};

struct Identity;

impl Filter for Identity {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Identity)
    }

    fn filter(&mut self, _: &Record<'_>) -> Verdict {
        Verdict::Keep
    }
}

quiver_plugin::export_filter!(Identity);
