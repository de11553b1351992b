//! The plugins loaded from the plugin folder, and the active set the request path reads.
//! Every change builds a new [`PluginSet`] and swaps it in with one pointer store; a request
//! keeps the set it started with, so a swap never fails a request.

use super::compile_cache::CompileCache;
use super::counters::Counters;
use super::engine::PluginEngine;
use super::loader;
use super::plugin::{CallLimits, Plugin, PluginKind};
use crate::config::{FailureMode, PluginsConfig};
use crate::metrics::Metrics;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, UNIX_EPOCH};

/// The plugins in force, by kind; limiters and health checks in file-name order. Shadow
/// plugins are among them (see [`Plugin::shadow`]); the prioritizer is the first enforcing
/// one, and shadow prioritizers are called beside it.
#[derive(Default)]
pub struct PluginSet {
    pub limiters: Vec<Arc<Plugin>>,
    pub prioritizer: Option<Arc<Plugin>>,
    pub shadow_prioritizers: Vec<Arc<Plugin>>,
    pub health: Vec<Arc<Plugin>>,
}

/// What the registry knows of one file stem (`NAME.wasm` + optional `NAME.json`).
struct Entry {
    active: Option<Arc<Plugin>>,
    /// Why the latest version of the file was refused, if it was.
    refused: Option<String>,
    refused_sha256: Option<String>,
    /// Hash of the wasm bytes and the config that produced the current state.
    content_key: String,
}

/// One row of `GET /plugins`.
#[derive(Serialize, Debug, Clone)]
pub struct PluginView {
    pub file: String,
    pub kind: Option<PluginKind>,
    pub world_version: Option<String>,
    pub sha256: Option<String>,
    pub loaded_at: Option<f64>,
    pub calls: u64,
    pub faults: u64,
    /// Whether its calls run inline on the request's async worker (true), or on the blocking
    /// pool because it imports WASI calls that wait on a tokio runtime (false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline_calls: Option<bool>,
    /// active, shadow (called, not enforced), disabled, inactive (another prioritizer wins) or
    /// refused.
    pub state: &'static str,
    pub reason: Option<String>,
}

pub struct PluginRegistry {
    pub dir: PathBuf,
    engine: Arc<PluginEngine>,
    cache: Option<CompileCache>,
    limits: CallLimits,
    health_limits: CallLimits,
    pub limiter_failure_mode: FailureMode,
    pub priority_failure_mode: FailureMode,
    pub headers: Vec<String>,
    pub quiet: Duration,
    /// File stems in shadow mode.
    shadow: Vec<String>,
    metrics: Arc<Metrics>,
    entries: Mutex<BTreeMap<String, Entry>>,
    active: RwLock<Arc<PluginSet>>,
}

/// The sha256 of a file, as `/plugins` reports it.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    Ok(sha256_hex(&std::fs::read(path)?))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl PluginRegistry {
    /// A registry for `config.dir` (created if missing), with its files loaded.
    pub fn start(
        dir: &Path,
        config: &PluginsConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("plugin folder {}: {e}", dir.display()))?;
        let memory = config.memory_limit_mb << 20;
        let limits = CallLimits {
            deadline: Duration::from_millis(config.call_deadline_ms),
            instantiate_deadline: Duration::from_millis(config.instantiate_deadline_ms),
            memory_bytes: memory,
            max_faults: config.max_consecutive_faults,
        };
        let counters = Arc::new(Counters::new(&config.shared_state, metrics.clone())?);
        let engine = Arc::new(PluginEngine::new(
            memory,
            counters,
            config.refused_imports.clone(),
        )?);
        let cache = config.compile_cache.then(|| {
            let cache_dir = config
                .compile_cache_dir
                .clone()
                .unwrap_or_else(|| dir.join(".cache"));
            CompileCache::new(cache_dir, &engine.engine)
        });
        let registry = Arc::new(PluginRegistry {
            dir: dir.to_path_buf(),
            engine,
            cache,
            health_limits: CallLimits {
                deadline: Duration::from_millis(config.health_deadline_ms),
                ..limits.clone()
            },
            limits,
            limiter_failure_mode: config.limiter_failure_mode,
            priority_failure_mode: config.priority_failure_mode,
            headers: config.headers.clone(),
            quiet: Duration::from_millis(config.reload_quiet_ms),
            shadow: config
                .shadow
                .iter()
                .map(|name| name.strip_suffix(".wasm").unwrap_or(name).to_string())
                .collect(),
            metrics,
            entries: Mutex::new(BTreeMap::new()),
            active: RwLock::new(Arc::new(PluginSet::default())),
        });
        registry.scan();
        Ok(registry)
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<PluginSet> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads every `*.wasm` in the folder.
    pub fn scan(&self) {
        for stem in self.wasm_stems() {
            self.reload(&stem);
        }
    }

    /// The stems of the `*.wasm` files in the folder, sorted (none when it cannot be read).
    pub fn wasm_stems(&self) -> Vec<String> {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut stems: Vec<String> = read
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                (path.extension()? == "wasm")
                    .then(|| path.file_stem()?.to_str().map(str::to_string))?
            })
            .collect();
        stems.sort();
        stems
    }

    /// The stems of every plugin the registry knows (loaded or refused).
    pub fn known_stems(&self) -> Vec<String> {
        self.lock_entries().keys().cloned().collect()
    }

    /// Brings plugin `stem` in line with its files: load, replace, refuse or remove.
    pub fn reload(&self, stem: &str) {
        let wasm_path = self.dir.join(format!("{stem}.wasm"));
        let file = format!("{stem}.wasm");
        let bytes = match std::fs::read(&wasm_path) {
            Ok(bytes) => bytes,
            Err(_) => {
                let removed = self.lock_entries().remove(stem).is_some();
                if removed {
                    tracing::info!(plugin = %file, "plugin removed");
                    self.count_reload(&file, "removed");
                    self.rebuild();
                }
                return;
            }
        };
        let config =
            std::fs::read_to_string(self.dir.join(format!("{stem}.json"))).unwrap_or_default();
        let sha256 = sha256_hex(&bytes);
        let content_key = format!("{sha256}:{}", sha256_hex(config.as_bytes()));
        // The same bytes and config as already handled: nothing to do, unless the plugin
        // was disabled after repeated faults, when writing its file again (even unchanged,
        // `touch` or `cp` over it) is how an operator turns it back on.
        if self.lock_entries().get(stem).is_some_and(|e| {
            e.content_key == content_key && !e.active.as_ref().is_some_and(|p| p.is_disabled())
        }) {
            return;
        }
        let started = std::time::Instant::now();
        let loaded = loader::compile(
            &self.engine,
            self.cache.as_ref(),
            &file,
            &bytes,
            &sha256,
            &self.metrics,
        )
        .and_then(|component| {
            loader::load(
                &self.engine,
                &component,
                &file,
                config,
                sha256.clone(),
                &self.limits,
                &self.health_limits,
                &self.metrics,
            )
        });
        let mut entries = self.lock_entries();
        match loaded {
            Ok(plugin) => {
                let plugin = plugin.with_shadow(self.shadow.iter().any(|s| s == stem));
                // Counted before it shows in `/plugins` (as a refusal is below).
                self.count_reload(&file, "loaded");
                let load_ms = started.elapsed().as_secs_f64() * 1e3;
                tracing::info!(plugin = %file, kind = plugin.kind.as_str(), mode = plugin.mode(), sha256 = %sha256, load_ms = format!("{load_ms:.1}"), "plugin loaded (compiled or from the cache, linked, trial call)");
                entries.insert(
                    stem.to_string(),
                    Entry {
                        active: Some(Arc::new(plugin)),
                        refused: None,
                        refused_sha256: None,
                        content_key,
                    },
                );
                drop(entries);
                self.rebuild();
            }
            Err(reason) => {
                // Counted before the refusal shows in `/plugins`, so whoever sees it there
                // also sees it counted.
                self.count_reload(&file, "refused");
                tracing::error!(plugin = %file, %reason, "plugin refused; the previous policy stays active");
                let entry = entries.entry(stem.to_string()).or_insert(Entry {
                    active: None,
                    refused: None,
                    refused_sha256: None,
                    content_key: String::new(),
                });
                entry.refused = Some(reason);
                entry.refused_sha256 = Some(sha256);
                entry.content_key = content_key;
                drop(entries);
            }
        }
    }

    fn count_reload(&self, file: &str, result: &str) {
        self.metrics
            .counter(
                "cllm_plugin_reloads_total",
                &[("plugin", file.to_string()), ("result", result.to_string())],
            )
            .increment(1);
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds the active set from the entries and swaps it in.
    fn rebuild(&self) {
        let entries = self.lock_entries();
        let mut set = PluginSet::default();
        for plugin in entries.values().filter_map(|e| e.active.clone()) {
            match plugin.kind {
                PluginKind::RateLimiter => set.limiters.push(plugin),
                PluginKind::Prioritizer if plugin.shadow => set.shadow_prioritizers.push(plugin),
                PluginKind::Prioritizer if set.prioritizer.is_none() => {
                    set.prioritizer = Some(plugin)
                }
                PluginKind::Prioritizer => {}
                PluginKind::HealthChecker => set.health.push(plugin),
            }
        }
        drop(entries);
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }

    /// Every file the registry knows, for `GET /plugins` and `/health`.
    pub fn list(&self) -> Vec<PluginView> {
        let current = self.current();
        let winner = current.prioritizer.as_ref().map(|p| p.file.clone());
        self.lock_entries()
            .iter()
            .map(|(stem, entry)| match &entry.active {
                Some(p) => {
                    let (state, reason) = if p.is_disabled() {
                        (
                            "disabled",
                            Some(
                                "disabled after repeated faults; replace the file to re-enable"
                                    .to_string(),
                            ),
                        )
                    } else if p.shadow {
                        (
                            "shadow",
                            Some("verdicts counted and logged, not enforced".to_string()),
                        )
                    } else if p.kind == PluginKind::Prioritizer
                        && winner.as_deref() != Some(&p.file)
                    {
                        (
                            "inactive",
                            winner
                                .as_ref()
                                .map(|w| format!("prioritizer {w} comes first by file name")),
                        )
                    } else {
                        (
                            "active",
                            entry
                                .refused
                                .as_ref()
                                .map(|r| format!("a newer file was refused: {r}")),
                        )
                    };
                    PluginView {
                        file: p.file.clone(),
                        kind: Some(p.kind),
                        world_version: Some(p.version.clone()),
                        sha256: Some(p.sha256.clone()),
                        loaded_at: p
                            .loaded_at
                            .duration_since(UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs_f64()),
                        calls: p.calls.load(std::sync::atomic::Ordering::Relaxed),
                        faults: p.faults.load(std::sync::atomic::Ordering::Relaxed),
                        inline_calls: Some(p.calls_inline()),
                        state,
                        reason,
                    }
                }
                None => PluginView {
                    file: format!("{stem}.wasm"),
                    kind: None,
                    world_version: None,
                    sha256: entry.refused_sha256.clone(),
                    loaded_at: None,
                    calls: 0,
                    faults: 0,
                    inline_calls: None,
                    state: "refused",
                    reason: entry.refused.clone(),
                },
            })
            .collect()
    }
}
