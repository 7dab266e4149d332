//! Misbehaving guest: answers with one verdict fewer than the batch has records, and names a
//! failure outside the batch. It implements the raw world directly (the SDK never does this).

use quiver_plugin::filter_world::{Batch, Config, Guest, PluginError, RecordFailure, Verdicts};

struct BadOutput;

impl Guest for BadOutput {
    fn init(_: Config) -> Result<(), PluginError> {
        Ok(())
    }

    fn filter(input: Batch) -> Result<Verdicts, PluginError> {
        Ok(Verdicts {
            keep: vec![true; input.count.saturating_sub(1) as usize],
            failures: vec![RecordFailure {
                index: input.count + 7,
                reason: "out of range".into(),
            }],
        })
    }
}

quiver_plugin::filter_world::export_filter_world!(BadOutput with_types_in quiver_plugin::filter_world);
