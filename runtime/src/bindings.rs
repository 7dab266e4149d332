//! The only place the WIT contract is turned into Rust (`bindgen!`), once per world. The
//! transform world reuses the filter world's types and host interfaces, so one set of host
//! implementations serves both.

/// Bindings of the `filter` world (and the shared types and host interfaces).
pub mod filter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "filter",
    });
}

/// Bindings of the `transform` world.
pub mod transform {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "transform",
        with: {
            "quiver:plugin/types": super::filter::quiver::plugin::types,
            "quiver:plugin/log": super::filter::quiver::plugin::log,
            "quiver:plugin/metrics": super::filter::quiver::plugin::metrics,
            "quiver:plugin/state": super::filter::quiver::plugin::state,
        },
    });
}

pub use filter::quiver::plugin::types::{Batch, PluginError as GuestError, RecordFailure};
