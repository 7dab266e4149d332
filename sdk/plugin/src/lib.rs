//! The guest SDK for Quiver plugins.
//!
//! A plugin is a WebAssembly component that a Quiver node runs on the stream (see `wit/` and
//! its README for the contract). This crate hides the contract's columnar batch: a plugin
//! author writes a plain function over one borrowed [`Record`] at a time, and one macro exports
//! it. Enable the cargo feature of the world the plugin implements (`filter` or `transform`;
//! one per component) and build with `cargo build --target wasm32-wasip2 --release`: the
//! `.wasm` it produces is the component to deploy.
//!
//! A complete filter that keeps records whose value contains a configured needle:
//!
//! ```ignore
//! use quiver_plugin::{Config, Filter, Record, Verdict};
//!
//! struct Contains { needle: Vec<u8> }
//!
//! impl Filter for Contains {
//!     fn init(config: &Config) -> Result<Self, String> {
//!         let needle = config.get("needle").filter(|n| !n.is_empty());
//!         let needle = needle.ok_or("missing parameter: needle (not empty)")?;
//!         Ok(Self { needle: needle.as_bytes().to_vec() })
//!     }
//!
//!     fn filter(&mut self, record: &Record<'_>) -> Verdict {
//!         let value = record.value.unwrap_or_default();
//!         Verdict::keep_if(value.windows(self.needle.len()).any(|w| w == self.needle))
//!     }
//! }
//!
//! quiver_plugin::export_filter!(Contains);
//! ```
//!
//! A transform implements [`Transform`] and emits zero or more [`OutputRecord`]s per input
//! record, each optionally routed to another topic ([`OutputRecord::to_topic`]); it is exported
//! with [`export_transform!`].
//!
//! Host services: [`log`] (structured logs), [`metrics`] (counters, gauges, histograms) and
//! [`state`] (keyed state private to the instance and partition).
#![forbid(unsafe_code)]

// The generated bindings name this crate by its path, from inside it too.
extern crate self as quiver_plugin;

mod batch;
mod host;
#[cfg(feature = "json")]
pub mod json;

pub use batch::{Config, Headers, OutputRecord, Record, Verdict};
pub use host::{Level, log, metrics, state};

/// Generated bindings of the `filter` world. Not part of the SDK's stable surface.
#[cfg(feature = "filter")]
#[doc(hidden)]
pub mod filter_world {
    wit_bindgen::generate!({
        world: "filter",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_filter_world",
        default_bindings_module: "quiver_plugin::filter_world",
        runtime_path: "quiver_plugin::__private::wit_bindgen::rt",
    });
}

/// Generated bindings of the `transform` world. Not part of the SDK's stable surface.
#[cfg(feature = "transform")]
#[doc(hidden)]
pub mod transform_world {
    wit_bindgen::generate!({
        world: "transform",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_transform_world",
        default_bindings_module: "quiver_plugin::transform_world",
        runtime_path: "quiver_plugin::__private::wit_bindgen::rt",
    });
}

/// A filter: keeps, drops or fails each record on its own.
pub trait Filter: Sized + 'static {
    /// Builds the plugin from its configuration (the attachment's `--param K=V` pairs). An
    /// error refuses the attachment with the message.
    fn init(config: &Config) -> Result<Self, String>;

    /// Decides one record. Records are given in offset order; state kept in `self` lasts for
    /// the life of the instance (use [`state`] for state that must survive a restart).
    fn filter(&mut self, record: &Record<'_>) -> Verdict;
}

/// A transform: turns each record into zero or more records.
pub trait Transform: Sized + 'static {
    /// Builds the plugin from its configuration, as [`Filter::init`].
    fn init(config: &Config) -> Result<Self, String>;

    /// Produces the outputs of one record by pushing them onto `out` (in order). An error
    /// fails this record alone (the attachment's error policy handles it); outputs pushed
    /// before the error are discarded.
    fn transform(&mut self, record: &Record<'_>, out: &mut Vec<OutputRecord>)
    -> Result<(), String>;
}

/// Exports a [`Filter`] implementation as the component's `filter` world.
#[cfg(feature = "filter")]
#[macro_export]
macro_rules! export_filter {
    ($plugin:ty) => {
        struct __QuiverFilterExport;
        impl $crate::filter_world::Guest for __QuiverFilterExport {
            fn init(
                config: $crate::filter_world::Config,
            ) -> ::core::result::Result<(), $crate::filter_world::PluginError> {
                $crate::__private::filter_init::<$plugin>(config)
            }
            fn filter(
                input: $crate::filter_world::Batch,
            ) -> ::core::result::Result<
                $crate::filter_world::Verdicts,
                $crate::filter_world::PluginError,
            > {
                $crate::__private::filter_batch::<$plugin>(input)
            }
        }
        $crate::filter_world::export_filter_world!(__QuiverFilterExport with_types_in $crate::filter_world);
    };
}

/// Exports a [`Transform`] implementation as the component's `transform` world.
#[cfg(feature = "transform")]
#[macro_export]
macro_rules! export_transform {
    ($plugin:ty) => {
        struct __QuiverTransformExport;
        impl $crate::transform_world::Guest for __QuiverTransformExport {
            fn init(
                config: $crate::transform_world::Config,
            ) -> ::core::result::Result<(), $crate::transform_world::PluginError> {
                $crate::__private::transform_init::<$plugin>(config)
            }
            fn transform(
                input: $crate::transform_world::Batch,
            ) -> ::core::result::Result<
                $crate::transform_world::Output,
                $crate::transform_world::PluginError,
            > {
                $crate::__private::transform_batch::<$plugin>(input)
            }
        }
        $crate::transform_world::export_transform_world!(__QuiverTransformExport with_types_in $crate::transform_world);
    };
}

/// Used by the export macros; not part of the SDK's stable surface.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    #[cfg(feature = "filter")]
    pub use crate::batch::filter_glue::{filter_batch, filter_init};
    #[cfg(feature = "transform")]
    pub use crate::batch::transform_glue::{transform_batch, transform_init};
}
