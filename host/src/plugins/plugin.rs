//! One loaded plugin: its pre-linked component, one live instance reused between calls (so a
//! limiter keeps its buckets), and fault accounting. Calls to one plugin are serialized by a
//! mutex; a trap, a deadline hit or an out-of-memory drops the instance, and the next call
//! builds a fresh one (state resets). After `max_faults` faults in a row the plugin is disabled
//! until its file changes.

use super::bindings::{v1, v2};
use super::bindings::{Decision, HealthReport, HealthSnapshot, RequestInfo, Usage};
use super::engine::{PluginData, PluginEngine};
use super::wasi::PluginLog;
use crate::metrics::Metrics;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Bytes of a fault's message kept for [`Plugin::last_fault`].
const MAX_FAULT_DETAIL: usize = 2048;
use std::time::{Duration, Instant};
use wasmtime::{Store, Trap};

/// Which world a plugin implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    RateLimiter,
    Prioritizer,
    HealthChecker,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::RateLimiter => "rate_limiter",
            PluginKind::Prioritizer => "prioritizer",
            PluginKind::HealthChecker => "health_checker",
        }
    }
}

/// Why a call did not return a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Trap,
    Deadline,
    OutOfMemory,
    /// The plugin was disabled after repeated faults; it was not called.
    Disabled,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Trap => "trap",
            Fault::Deadline => "deadline",
            Fault::OutOfMemory => "out_of_memory",
            Fault::Disabled => "disabled",
        }
    }
}

/// A pre-linked component, by world and `cllm:policy` version.
pub(super) enum Pre {
    Limiter(v2::limiter::RateLimiterPre<PluginData>),
    Prioritizer(v2::prioritizer::PrioritizerPre<PluginData>),
    Health(v2::health::HealthCheckerPre<PluginData>),
    LimiterV1(v1::limiter::RateLimiterPre<PluginData>),
    PrioritizerV1(v1::prioritizer::PrioritizerPre<PluginData>),
    HealthV1(v1::health::HealthCheckerPre<PluginData>),
}

enum Bindings {
    Limiter(v2::limiter::RateLimiter),
    Prioritizer(v2::prioritizer::Prioritizer),
    Health(v2::health::HealthChecker),
    LimiterV1(v1::limiter::RateLimiter),
    PrioritizerV1(v1::prioritizer::Prioritizer),
    HealthV1(v1::health::HealthChecker),
}

struct Live {
    store: Store<PluginData>,
    bindings: Bindings,
}

/// Limits a plugin runs under.
#[derive(Clone, Debug)]
pub struct CallLimits {
    pub deadline: Duration,
    /// Deadline of building a fresh instance (before the call's own deadline starts): large
    /// components (Python's) need milliseconds to set up their memory, more on first use.
    pub instantiate_deadline: Duration,
    pub memory_bytes: usize,
    pub max_faults: u32,
}

pub struct Plugin {
    pub file: String,
    pub kind: PluginKind,
    /// The `cllm:policy` version the component was built against.
    pub version: String,
    pub sha256: String,
    pub loaded_at: std::time::SystemTime,
    engine: Arc<PluginEngine>,
    pre: Pre,
    config: String,
    limits: CallLimits,
    live: Mutex<Option<Live>>,
    /// Its WASI stdout and stderr, as log lines (shared by its successive instances).
    pub log: PluginLog,
    metrics: Arc<Metrics>,
    /// Verdicts are counted and logged but never enforced (`plugins.shadow`).
    pub shadow: bool,
    /// Its calls may run on an async worker: it imports no WASI call that blocks on a tokio
    /// runtime (see [`super::wasi::waits_on_tokio`]).
    inline: bool,
    /// Registered once: a call only bumps them.
    calls_metric: metrics::Counter,
    duration_metric: metrics::Histogram,
    /// `cllm_plugin_decisions_total` by decision, for this plugin's kind and mode; registered
    /// by [`Plugin::with_shadow`], which the registry calls for every plugin it loads (a plugin
    /// only checked offline counts nothing).
    decisions: Vec<(&'static str, metrics::Counter)>,
    pub calls: AtomicU64,
    pub faults: AtomicU64,
    consecutive_faults: AtomicU32,
    disabled: AtomicBool,
    /// What the latest fault said (a trap's message and the plugin's backtrace), for the
    /// load-time refusal and `cllm plugin check`, which have no log to point to.
    last_fault: Mutex<Option<String>>,
    /// No call has run yet: the next one is the load-time trial (see [`Plugin::call_with`]).
    first_call: AtomicBool,
}

impl Plugin {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        file: String,
        kind: PluginKind,
        version: String,
        sha256: String,
        engine: Arc<PluginEngine>,
        pre: Pre,
        config: String,
        limits: CallLimits,
        metrics: Arc<Metrics>,
    ) -> Plugin {
        let labels = [
            ("plugin", file.clone()),
            ("kind", kind.as_str().to_string()),
        ];
        let log = PluginLog::new(&file);
        Plugin {
            calls_metric: metrics.counter("cllm_plugin_calls_total", &labels),
            duration_metric: metrics.histogram("cllm_plugin_call_duration_seconds", &labels),
            decisions: Vec::new(),
            shadow: false,
            inline: false,
            file,
            kind,
            version,
            sha256,
            loaded_at: std::time::SystemTime::now(),
            engine,
            pre,
            config,
            limits,
            live: Mutex::new(None),
            log,
            metrics,
            calls: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            consecutive_faults: AtomicU32::new(0),
            disabled: AtomicBool::new(false),
            last_fault: Mutex::new(None),
            first_call: AtomicBool::new(true),
        }
    }

    /// This plugin in shadow mode (`shadow`) or enforcing, with its decision counters.
    pub(super) fn with_shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self.decisions = decision_counters(&self.metrics, &self.file, self.kind, self.mode());
        self
    }

    /// This plugin, its calls allowed on an async worker or not.
    pub(super) fn with_inline_calls(mut self, inline: bool) -> Self {
        self.inline = inline;
        self
    }

    /// Whether its calls may run on an async worker (they still may take up to the call
    /// deadline there).
    pub fn calls_inline(&self) -> bool {
        self.inline
    }

    /// `enforce` or `shadow`, as the metrics and logs say it.
    pub fn mode(&self) -> &'static str {
        if self.shadow {
            "shadow"
        } else {
            "enforce"
        }
    }

    /// Counts one verdict (`allow`, `reject`, `priority`, `healthy`, `degraded`, `unhealthy`).
    pub fn count_decision(&self, decision: &str) {
        if let Some((_, counter)) = self.decisions.iter().find(|(d, _)| *d == decision) {
            counter.increment(1);
        }
    }

    /// The live instance's peak linear memory in bytes (none before the first call or after a
    /// fault dropped it).
    pub fn memory_peak(&self) -> Option<usize> {
        self.lock_live()
            .as_ref()
            .map(|l| l.store.data().memory_peak)
    }

    /// Drops the live instance: the next call builds a fresh one (its state starts over).
    pub fn drop_instance(&self) {
        *self.lock_live() = None;
    }

    /// The instance slot (a panic inside a call does not leave it unusable).
    fn lock_live(&self) -> MutexGuard<'_, Option<Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    fn instantiate(&self) -> wasmtime::Result<Live> {
        let data = PluginData::new(
            &self.file,
            self.config.clone(),
            self.limits.memory_bytes,
            &self.log,
            &self.engine.counters,
        );
        let mut store = Store::new(&self.engine.engine, data);
        store.limiter(|data| data);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(PluginEngine::ticks(self.limits.instantiate_deadline));
        let bindings = match &self.pre {
            Pre::Limiter(pre) => Bindings::Limiter(pre.instantiate(&mut store)?),
            Pre::Prioritizer(pre) => Bindings::Prioritizer(pre.instantiate(&mut store)?),
            Pre::Health(pre) => Bindings::Health(pre.instantiate(&mut store)?),
            Pre::LimiterV1(pre) => Bindings::LimiterV1(pre.instantiate(&mut store)?),
            Pre::PrioritizerV1(pre) => Bindings::PrioritizerV1(pre.instantiate(&mut store)?),
            Pre::HealthV1(pre) => Bindings::HealthV1(pre.instantiate(&mut store)?),
        };
        Ok(Live { store, bindings })
    }

    /// Runs `f` on the live instance under the deadline; a failure is a fault. Only calls that
    /// return a verdict (`verdict`) end a run of consecutive faults: a limiter whose `check`
    /// always traps stays broken even if its `record-usage` works.
    fn call<R>(
        &self,
        verdict: bool,
        f: impl FnOnce(&mut Store<PluginData>, &Bindings) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        if self.is_disabled() {
            return Err(Fault::Disabled);
        }
        let started = Instant::now();
        // A call takes microseconds, but building an instance (the first call, or the one
        // after a fault dropped it) may take up to the instantiate deadline: an inline
        // plugin's call that must build one first leaves the async worker too.
        if self.inline {
            let live = self.lock_live();
            if live.is_some() {
                return self.call_with(verdict, started, live, f);
            }
        }
        // Some WASI calls (reading files, waiting on pollables) block on a tokio runtime,
        // which may not happen on an async worker thread. The request path calls such
        // plugins on the blocking pool, where this costs nothing; it is the safety net for
        // the rest (the trial call of a load started from async code).
        crate::blocking::off_async_workers(|| self.call_with(verdict, started, self.lock_live(), f))
    }

    /// Runs `f` on the instance in `live` (built first if there is none), under the deadline.
    /// The plugin's very first call (the loader's trial call, off the request path) runs under
    /// the instantiate deadline instead: a large component's first call on a fresh instance
    /// (a Python interpreter touching its heap) can take longer than a warm call's deadline on
    /// a busy machine, and refusing the file for that would be wrong. Later calls, including
    /// the first one on an instance rebuilt after a fault, keep the call deadline, so a
    /// looping plugin costs a request no more than that.
    fn call_with<R>(
        &self,
        verdict: bool,
        started: Instant,
        mut live: MutexGuard<'_, Option<Live>>,
        f: impl FnOnce(&mut Store<PluginData>, &Bindings) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        let result = (|| {
            if live.is_none() {
                *live = Some(self.instantiate()?);
            }
            let Some(Live { store, bindings }) = live.as_mut() else {
                wasmtime::bail!("no instance");
            };
            let deadline = if self.first_call.swap(false, Ordering::Relaxed) {
                self.limits.instantiate_deadline
            } else {
                self.limits.deadline
            };
            store.set_epoch_deadline(PluginEngine::ticks(deadline));
            f(store, bindings)
        })();
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.calls_metric.increment(1);
        self.duration_metric.record(started.elapsed().as_secs_f64());
        match result {
            Ok(value) => {
                if verdict {
                    self.consecutive_faults.store(0, Ordering::Relaxed);
                }
                Ok(value)
            }
            Err(error) => {
                let out_of_memory = live.as_ref().is_some_and(|l| l.store.data().out_of_memory);
                // A trapped instance cannot be entered again: drop it, rebuild on next call.
                *live = None;
                drop(live);
                Err(self.record_fault(&error, out_of_memory))
            }
        }
    }

    fn record_fault(&self, error: &wasmtime::Error, out_of_memory: bool) -> Fault {
        let fault = if out_of_memory {
            Fault::OutOfMemory
        } else {
            classify(error)
        };
        self.faults.fetch_add(1, Ordering::Relaxed);
        let labels = [
            ("plugin", self.file.clone()),
            ("kind", self.kind.as_str().to_string()),
            ("fault", fault.as_str().to_string()),
        ];
        self.metrics
            .counter("cllm_plugin_faults_total", &labels)
            .increment(1);
        let mut detail = format!("{error:#}");
        if detail.len() > MAX_FAULT_DETAIL {
            detail = crate::text::truncate(detail, MAX_FAULT_DETAIL) + " [...]";
        }
        *self
            .last_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(detail);
        let in_a_row = self.consecutive_faults.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= self.limits.max_faults && !self.disabled.swap(true, Ordering::Relaxed) {
            tracing::error!(plugin = %self.file, faults = in_a_row, "plugin disabled after repeated faults; replace its file to re-enable it");
        } else {
            tracing::warn!(plugin = %self.file, fault = fault.as_str(), "plugin fault: {error:#}");
        }
        fault
    }

    /// `fault` in words, with what the latest fault said when there is something (a trap's
    /// message, a Python traceback): `trap: ...`, or just `trap`.
    pub fn describe_fault(&self, fault: Fault) -> String {
        let last = self
            .last_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match last.as_deref() {
            Some(detail) => format!("{}: {detail}", fault.as_str()),
            None => fault.as_str().to_string(),
        }
    }

    pub fn check(&self, request: &RequestInfo) -> Result<Decision, Fault> {
        self.call(true, |store, bindings| match bindings {
            Bindings::Limiter(b) => b.cllm_policy_rate_limit().call_check(store, request),
            Bindings::LimiterV1(b) => b
                .cllm_policy_rate_limit()
                .call_check(store, &v1::request_info(request))
                .map(v1::decision),
            _ => wasmtime::bail!("not a rate limiter"),
        })
    }

    pub fn record_usage(&self, usage: &Usage) -> Result<(), Fault> {
        self.call(false, |store, bindings| match bindings {
            Bindings::Limiter(b) => b.cllm_policy_rate_limit().call_record_usage(store, usage),
            Bindings::LimiterV1(b) => b
                .cllm_policy_rate_limit()
                .call_record_usage(store, &v1::usage(usage)),
            _ => wasmtime::bail!("not a rate limiter"),
        })
    }

    pub fn priority(&self, request: &RequestInfo) -> Result<i32, Fault> {
        self.call(true, |store, bindings| match bindings {
            Bindings::Prioritizer(b) => b.cllm_policy_priority().call_priority(store, request),
            Bindings::PrioritizerV1(b) => b
                .cllm_policy_priority()
                .call_priority(store, &v1::request_info(request)),
            _ => wasmtime::bail!("not a prioritizer"),
        })
    }

    pub fn health(&self, snapshot: &HealthSnapshot) -> Result<HealthReport, Fault> {
        self.call(true, |store, bindings| match bindings {
            Bindings::Health(b) => b.cllm_policy_health_check().call_check(store, *snapshot),
            Bindings::HealthV1(b) => b
                .cllm_policy_health_check()
                .call_check(store, v1::health_snapshot(snapshot))
                .map(v1::health_report),
            _ => wasmtime::bail!("not a health checker"),
        })
    }
}

/// The verdicts a plugin of `kind` can give, each with its counter.
fn decision_counters(
    metrics: &Metrics,
    file: &str,
    kind: PluginKind,
    mode: &str,
) -> Vec<(&'static str, metrics::Counter)> {
    let decisions: &[&'static str] = match kind {
        PluginKind::RateLimiter => &["allow", "reject"],
        PluginKind::Prioritizer => &["priority"],
        PluginKind::HealthChecker => &["healthy", "degraded", "unhealthy"],
    };
    decisions
        .iter()
        .map(|&decision| {
            let labels = [
                ("plugin", file.to_string()),
                ("decision", decision.to_string()),
                ("mode", mode.to_string()),
            ];
            (
                decision,
                metrics.counter("cllm_plugin_decisions_total", &labels),
            )
        })
        .collect()
}

fn classify(error: &wasmtime::Error) -> Fault {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Fault::Deadline,
        _ => Fault::Trap,
    }
}
