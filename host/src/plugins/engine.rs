//! The one wasmtime engine all plugins share: epoch interruption driven by a ticker thread
//! (call deadlines), the pooling allocator (fast, bounded instantiation), and a linker with
//! cllm's `host` interface and the WASI 0.2 that [`super::wasi`] describes. A component that
//! imports anything else is refused at load.

use super::bindings::{v1, v2, LogLevel};
use super::counters::Counters;
use super::wasi::PluginLog;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

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
    /// WASI state: output to the log, clocks, randomness, nothing else (see [`super::wasi`]).
    pub wasi: WasiCtx,
    /// WASI's resources (streams, pollables) owned by the instance.
    pub table: ResourceTable,
    /// The store behind `cllm:policy/counters`.
    pub counters: Arc<Counters>,
}

impl PluginData {
    /// The store data of a new instance of the plugin `name`.
    pub fn new(
        name: &str,
        config: String,
        memory_limit: usize,
        log: &PluginLog,
        counters: &Arc<Counters>,
    ) -> PluginData {
        PluginData {
            counters: counters.clone(),
            name: name.to_string(),
            config,
            memory_limit,
            out_of_memory: false,
            memory_peak: 0,
            wasi: super::wasi::context(log),
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for PluginData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
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

impl PluginData {
    fn log_line(&self, level: LogLevel, message: &str) {
        let plugin = self.name.as_str();
        match level {
            LogLevel::Debug => tracing::debug!(plugin = %plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin = %plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin = %plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin = %plugin, "{message}"),
        }
    }

    fn uptime_ms(&self) -> u64 {
        process_start().elapsed().as_millis() as u64
    }
}

impl v2::limiter::cllm::policy::host::Host for PluginData {
    fn log(&mut self, level: LogLevel, message: String) {
        self.log_line(level, &message);
    }

    fn now_ms(&mut self) -> u64 {
        self.uptime_ms()
    }

    fn config(&mut self) -> String {
        self.config.clone()
    }
}

impl v1::limiter::cllm::policy::host::Host for PluginData {
    fn log(&mut self, level: v1::LogLevel, message: String) {
        let level = match level {
            v1::LogLevel::Debug => LogLevel::Debug,
            v1::LogLevel::Info => LogLevel::Info,
            v1::LogLevel::Warn => LogLevel::Warn,
            v1::LogLevel::Error => LogLevel::Error,
        };
        self.log_line(level, &message);
    }

    fn now_ms(&mut self) -> u64 {
        self.uptime_ms()
    }

    fn config(&mut self) -> String {
        self.config.clone()
    }
}

impl v2::limiter::cllm::policy::counters::Host for PluginData {
    fn incr(&mut self, key: String, delta: i64, window_ms: u64) -> Result<i64, String> {
        self.counters.incr(&key, delta, window_ms)
    }
}

impl v2::limiter::cllm::policy::types::Host for PluginData {}
impl v1::limiter::cllm::policy::types::Host for PluginData {}

/// The engine, its linker, and the ticker that drives deadlines.
pub struct PluginEngine {
    pub engine: Engine,
    linker: Linker<PluginData>,
    /// The store behind `cllm:policy/counters`, shared by every plugin.
    pub counters: Arc<Counters>,
    /// Import prefixes refused at load on top of what cllm does not offer
    /// (`plugins.refused_imports`).
    pub refused_imports: Vec<String>,
    stop: Arc<AtomicBool>,
}

impl PluginEngine {
    pub fn new(
        memory_limit_bytes: usize,
        counters: Arc<Counters>,
        refused_imports: Vec<String>,
    ) -> anyhow::Result<PluginEngine> {
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
            // The pool's own cap (20,000 by default) is below what large components (Python,
            // JavaScript) declare; tables are reserved, not committed, at this size.
            .table_elements(MAX_TABLE_ELEMENTS)
            .max_memory_size(memory_limit_bytes.max(1 << 20));
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(to_anyhow)?;
        let mut linker = Linker::new(&engine);
        // Every world of a version imports the same interfaces: the rate limiter's cover all.
        v2::limiter::RateLimiter::add_to_linker::<PluginData, HasSelf<PluginData>>(
            &mut linker,
            |data| data,
        )
        .map_err(to_anyhow)?;
        v1::limiter::RateLimiter::add_to_linker::<PluginData, HasSelf<PluginData>>(
            &mut linker,
            |data| data,
        )
        .map_err(to_anyhow)?;
        super::wasi::add_to_linker(&mut linker).map_err(to_anyhow)?;
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
            counters,
            refused_imports,
            stop,
        })
    }

    /// The linker every plugin is instantiated with: cllm's host interface and WASI.
    pub fn linker(&self) -> &Linker<PluginData> {
        &self.linker
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
