//! The one wasmtime engine all plugins share: epoch interruption driven by a ticker thread
//! (call deadlines), the pooling allocator (fast, bounded instantiation), and a linker with
//! cllm's `host` interface. Plugins get nothing else: any other import (WASI included) traps.

use super::bindings::limiter::cllm::policy::{host, types};
use super::bindings::LogLevel;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
};

/// How often the epoch advances: the resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Per-instance data a plugin's store carries.
pub struct PluginData {
    /// The plugin's file name, for its log lines.
    pub name: String,
    /// The sidecar config text, "" if none.
    pub config: String,
    /// Most bytes of linear memory the instance may have.
    pub memory_limit: usize,
    /// Set when the instance asked for more memory than its limit (its fault is then
    /// out-of-memory, whatever trap the guest ends in).
    pub out_of_memory: bool,
    /// The most linear memory the instance has asked for and got, in bytes.
    pub memory_peak: usize,
}

/// Largest table an instance may grow (function references; plugins need few).
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for PluginData {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.out_of_memory = true;
            wasmtime::bail!(
                "plugin memory limit of {} bytes exceeded",
                self.memory_limit
            );
        }
        self.memory_peak = self.memory_peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

fn to_anyhow(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl host::Host for PluginData {
    fn log(&mut self, level: LogLevel, message: String) {
        let plugin = self.name.as_str();
        match level {
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        process_start().elapsed().as_millis() as u64
    }

    fn config(&mut self) -> String {
        self.config.clone()
    }
}

impl types::Host for PluginData {}

/// The engine, its linker, and the ticker that drives deadlines.
pub struct PluginEngine {
    pub engine: Engine,
    linker: Linker<PluginData>,
    stop: Arc<AtomicBool>,
}

impl PluginEngine {
    pub fn new(memory_limit_bytes: usize) -> anyhow::Result<PluginEngine> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Synchronous calls only: without async support each call is about twice as cheap.
        config.concurrency_support(false);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(256)
            .total_core_instances(1024)
            .total_memories(512)
            .total_tables(512)
            .max_memory_size(memory_limit_bytes.max(1 << 20));
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(to_anyhow)?;
        let mut linker = Linker::new(&engine);
        super::bindings::limiter::RateLimiter::add_to_linker::<PluginData, HasSelf<PluginData>>(
            &mut linker,
            |data| data,
        )
        .map_err(to_anyhow)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let ticker_stop = stop.clone();
        std::thread::Builder::new()
            .name("cllm-plugin-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })?;
        Ok(PluginEngine {
            engine,
            linker,
            stop,
        })
    }

    /// A linker for `component`: cllm's host interface, and traps for anything else it imports.
    pub fn linker_for(&self, component: &Component) -> anyhow::Result<Linker<PluginData>> {
        let mut linker = self.linker.clone();
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(to_anyhow)?;
        Ok(linker)
    }

    /// Epoch ticks for a deadline (at least one full tick).
    pub fn ticks(deadline: Duration) -> u64 {
        (deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
