//! Misbehaving guest: answers in ways that break the contract, chosen by the `mode`
//! parameter: `short` (default) returns one verdict fewer than the batch has records,
//! `out-of-range` names a failure outside the batch, `duplicate` names the same record as
//! failed twice, `error` returns `plugin-error.internal`. It implements the raw world
//! directly (the SDK never produces such output).

use std::cell::RefCell;

use quiver_plugin::filter_world::{Batch, Config, Guest, PluginError, RecordFailure, Verdicts};

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct BadOutput;

impl Guest for BadOutput {
    fn init(config: Config) -> Result<(), PluginError> {
        let mode = config
            .into_iter()
            .rev()
            .find(|(k, _)| k == "mode")
            .map(|(_, v)| v)
            .unwrap_or_else(|| "short".into());
        MODE.with(|m| *m.borrow_mut() = mode);
        Ok(())
    }

    fn filter(input: Batch) -> Result<Verdicts, PluginError> {
        let n = input.count;
        let failure = |index| RecordFailure {
            index,
            reason: "bad".into(),
        };
        MODE.with(|m| match m.borrow().as_str() {
            "out-of-range" => Ok(Verdicts {
                keep: vec![true; n as usize],
                failures: vec![failure(n + 7)],
            }),
            "duplicate" => Ok(Verdicts {
                keep: vec![true; n as usize],
                failures: vec![failure(0), failure(0)],
            }),
            "error" => Err(PluginError::Internal("the plugin gave up".into())),
            _ => Ok(Verdicts {
                keep: vec![true; n.saturating_sub(1) as usize],
                failures: Vec::new(),
            }),
        })
    }
}

quiver_plugin::filter_world::export_filter_world!(BadOutput with_types_in quiver_plugin::filter_world);
