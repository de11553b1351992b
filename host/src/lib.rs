//! cllm: an LLM inference server whose admission policies are WebAssembly plugins.
//!
//! Data flows one way: `http` (parse, validate) → `admission` (auth, rate limit, queue) →
//! `scheduler` (continuous batching) → `model` (executor) → token stream back to `http`.

pub mod admission;
pub mod blocking;
pub mod cli;
pub mod config;
pub mod error;
pub mod fuzz_targets;
pub mod health;
pub mod http;
pub mod metrics;
pub mod model;
pub mod plugins;
pub mod scheduler;
pub mod server;
pub mod text;
pub mod tracker;
