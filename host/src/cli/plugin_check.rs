//! `cllm plugin check FILE.wasm`: what a plugin author wants to know before dropping a file
//! into a server's plugin folder. The file goes through the server's own loader (compile, world
//! and version, linking, trial call); then the first call's verdict, the timing of many calls
//! and the instance's peak memory are printed. Any problem (a refused file, a fault in any
//! call) ends with a non-zero exit code.

use crate::config::PluginsConfig;
use crate::metrics::Metrics;
use crate::plugins::bindings::{health_status_name, Decision, HealthReport};
use crate::plugins::engine::PluginEngine;
use crate::plugins::loader;
use crate::plugins::plugin::{CallLimits, Fault, Plugin, PluginKind};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PluginCommand {
    /// Load a plugin offline as the server would, call it, and report what it is and costs.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The component (`NAME.wasm`).
    file: PathBuf,
    /// Its JSON config (what `NAME.json` would hold in the plugin folder); default: the
    /// `NAME.json` beside the file, if there is one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Calls timed after the first.
    #[arg(long, default_value_t = 1000)]
    calls: usize,
    /// Deadline of one call, in ms (default: the server's, `plugins.call_deadline_ms`, or
    /// `plugins.health_deadline_ms` for health checks).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Memory limit, in MiB (default: the server's, `plugins.memory_limit_mb`).
    #[arg(long)]
    memory_limit_mb: Option<usize>,
    /// The server's configuration file (`cllm serve --config`), whose `plugins` section
    /// (deadlines, memory limit, refused imports) the check then uses instead of the defaults;
    /// its counters still stay in memory unless `--redis-url` names a Redis.
    #[arg(long)]
    server_config: Option<PathBuf>,
    /// Keep `cllm:policy/counters` in this Redis (`redis://host:port/`), as a server with
    /// `plugins.shared_state.redis_url` would, to time the plugin with it; default: in
    /// memory. The plugin's counter keys in that Redis are really incremented.
    #[arg(long)]
    redis_url: Option<String>,
}

pub fn run(args: PluginArgs) -> anyhow::Result<()> {
    match args.command {
        PluginCommand::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let defaults = match &args.server_config {
        Some(path) => {
            let config = crate::config::ServerConfig::from_file(path)
                .with_context(|| format!("reading the server config {}", path.display()))?;
            config.validate()?;
            config.plugins
        }
        None => PluginsConfig::default(),
    };
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let config_path = args
        .config
        .clone()
        .or_else(|| Some(args.file.with_extension("json")).filter(|p| p.is_file()));
    let config = match &config_path {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the config {}", path.display()))?,
        None => String::new(),
    };
    let file = args.file.file_name().map_or_else(
        || "plugin.wasm".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let memory = args.memory_limit_mb.unwrap_or(defaults.memory_limit_mb) << 20;
    let limits = |ms: u64| CallLimits {
        deadline: Duration::from_millis(args.deadline_ms.unwrap_or(ms)),
        instantiate_deadline: Duration::from_millis(defaults.instantiate_deadline_ms),
        memory_bytes: memory,
        max_faults: u32::MAX,
    };
    let sha256 = crate::plugins::registry::sha256_hex(&bytes);
    println!("file: {file} ({} bytes, sha256 {sha256})", bytes.len());
    if let Some(path) = &config_path {
        println!("config: {}", path.display());
    }
    let metrics = Arc::new(Metrics::new(false));
    // Counters in this process unless a Redis is named (with the server's default timeout).
    let shared_state = crate::config::SharedStateConfig {
        redis_url: args.redis_url.clone(),
        ..defaults.shared_state.clone()
    };
    let counters = Arc::new(crate::plugins::counters::Counters::new(
        &shared_state,
        metrics.clone(),
    )?);
    let engine = Arc::new(PluginEngine::new(
        memory,
        counters,
        defaults.refused_imports.clone(),
    )?);
    let refused = |reason: String| anyhow::anyhow!("{file} would be refused: {reason}");
    let start = Instant::now();
    let component =
        loader::compile(&engine, None, &file, &bytes, &sha256, &metrics).map_err(refused)?;
    let compiled_ms = start.elapsed().as_secs_f64() * 1e3;
    println!(
        "imports: {}",
        loader::imports(&engine, &component).join(", ")
    );
    let plugin = loader::load(
        &engine,
        &component,
        &file,
        config,
        sha256,
        &limits(defaults.call_deadline_ms),
        &limits(defaults.health_deadline_ms),
        &metrics,
    )
    .map_err(refused)?;
    println!(
        "loaded in {:.1} ms (compile {compiled_ms:.1} ms, then link, instantiate, trial call)",
        start.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "world: {}, cllm:policy@{}",
        world_name(plugin.kind),
        plugin.version
    );
    let first = one_call(&plugin, 0).map_err(|fault| fault_error(&plugin, fault))?;
    println!("first call: {first}");

    let mut times = Vec::with_capacity(args.calls);
    let mut faults: Vec<Fault> = Vec::new();
    for i in 0..args.calls {
        let start = Instant::now();
        let result = one_call(&plugin, i + 1);
        times.push(start.elapsed());
        if let Err(fault) = result {
            faults.push(fault);
        }
    }
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "{} calls: p50 {:.2} µs, p99 {:.2} µs, max {:.2} µs",
        args.calls,
        at(0.5),
        at(0.99),
        at(1.0)
    );
    // What a fault or a config change costs the next call: a fresh instance.
    plugin.drop_instance();
    let fresh = Instant::now();
    one_call(&plugin, args.calls + 1).map_err(|fault| fault_error(&plugin, fault))?;
    println!(
        "fresh instance and its first call: {:.2} ms",
        fresh.elapsed().as_secs_f64() * 1e3
    );
    if let Some(peak) = plugin.memory_peak() {
        println!(
            "memory: {:.2} MiB of linear memory at peak (limit {} MiB)",
            peak as f64 / (1 << 20) as f64,
            memory >> 20
        );
    }
    let (lines, dropped) = plugin.log.counts();
    if lines + dropped > 0 {
        println!(
            "output: {lines} lines to the log, {dropped} dropped by its rate limit ({} lines/s, bursts of {})",
            crate::plugins::wasi::LINES_PER_SECOND,
            crate::plugins::wasi::LINE_BURST
        );
    }
    if let Some(first) = faults.first() {
        anyhow::bail!(
            "{} of {} calls faulted (the first: {})",
            faults.len(),
            args.calls,
            first.as_str()
        );
    }
    println!("ok");
    Ok(())
}

fn world_name(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::RateLimiter => "rate-limiter",
        PluginKind::Prioritizer => "prioritizer",
        PluginKind::HealthChecker => "health-checker",
    }
}

/// The fault with what it said (a trap's message, a Python traceback, ...).
fn fault_error(plugin: &Plugin, fault: Fault) -> anyhow::Error {
    anyhow::anyhow!("the first call faulted: {}", plugin.describe_fault(fault))
}

/// One call of the plugin's own function; its verdict in words.
fn one_call(plugin: &Plugin, i: usize) -> Result<String, Fault> {
    match plugin.kind {
        PluginKind::RateLimiter => {
            plugin
                .check(&super::bench_plugins::request(i))
                .map(|d| match d {
                    Decision::Allow => "allow".to_string(),
                    Decision::Reject(r) => {
                        format!(
                            "reject ({:?}, retry after {} ms)",
                            r.reason, r.retry_after_ms
                        )
                    }
                })
        }
        PluginKind::Prioritizer => plugin
            .priority(&super::bench_plugins::request(i))
            .map(|p| format!("priority {p}")),
        PluginKind::HealthChecker => {
            plugin
                .health(&loader::trial_snapshot())
                .map(|HealthReport { status, message }| {
                    format!("{}: {message:?}", health_status_name(status))
                })
        }
    }
}
