//! Policy plugins: WebAssembly components (see `wit/policy.wit`) loaded from a folder, hot
//! swapped when their files change, and cut off when they trap, run past their deadline or eat
//! memory.
//!
//! Concurrency model: each plugin has one instance, and calls to it are serialized by a mutex,
//! so a limiter's state (its buckets) lives in that instance between calls. The state resets
//! when the plugin is replaced or when a fault forces a fresh instance.

pub mod bindings;
pub mod compile_cache;
pub mod counters;
pub(crate) mod engine;
pub(crate) mod loader;
pub mod plugin;
pub mod registry;
pub mod wasi;
pub mod watcher;

pub use plugin::{Fault, Plugin, PluginKind};
pub use registry::{PluginRegistry, PluginSet, PluginView};
