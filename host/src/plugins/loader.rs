//! Turning a `.wasm` file into a [`Plugin`]: compile, find which of cllm's worlds it
//! implements (and at which version), pre-link it, and give it one trial call.

use super::bindings::{v1, v2, Api, Decision, HealthSnapshot, Outcome, RequestInfo, Usage};
use super::compile_cache::CompileCache;
use super::engine::PluginEngine;
use super::plugin::{CallLimits, Plugin, PluginKind, Pre};
use crate::metrics::Metrics;
use std::sync::Arc;
use wasmtime::component::Component;

/// The package versions this server binds, newest first; a component must match one's major
/// and (while the major is 0) minor version.
pub const POLICY_VERSIONS: [(u64, u64); 2] = [(0, 2), (0, 1)];

/// Which world `component` implements, from its exports, and the version it was built for.
fn detect_world(
    engine: &PluginEngine,
    component: &Component,
) -> Result<(PluginKind, String, (u64, u64)), String> {
    let ty = component.component_type();
    let mut ours = Vec::new();
    let mut others = Vec::new();
    for (name, _) in ty.exports(&engine.engine) {
        match name.strip_prefix("cllm:policy/") {
            Some(rest) => ours.push(rest.to_string()),
            None => others.push(name.to_string()),
        }
    }
    let export = match ours.as_slice() {
        [one] => one,
        [] => {
            return Err(format!(
                "implements none of cllm's worlds (rate-limiter, prioritizer, health-checker); it exports [{}]",
                others.join(", ")
            ))
        }
        // Each file is one policy of one kind: the others would be silently unused.
        several => {
            return Err(format!(
                "exports several cllm:policy interfaces [{}]; a plugin file implements one world \
                 (build one component per world)",
                several.join(", ")
            ))
        }
    };
    let (interface, version) = export.split_once('@').unwrap_or((export.as_str(), ""));
    let kind = match interface {
        "rate-limit" => PluginKind::RateLimiter,
        "priority" => PluginKind::Prioritizer,
        "health-check" => PluginKind::HealthChecker,
        other => return Err(format!("exports unknown cllm:policy interface {other:?}")),
    };
    let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
    let (major, minor) = (parts.next().flatten(), parts.next().flatten());
    let bound = POLICY_VERSIONS
        .into_iter()
        .find(|&(want_major, want_minor)| {
            major == Some(want_major) && (want_major > 0 || minor == Some(want_minor))
        });
    let Some(bound) = bound else {
        let spoken: Vec<String> = POLICY_VERSIONS
            .iter()
            .map(|(a, b)| format!("{a}.{b}.x"))
            .collect();
        return Err(format!(
            "built for cllm:policy@{version}, but this server speaks cllm:policy@{} (unsupported version)",
            spoken.join(" and @")
        ));
    };
    Ok((kind, version.to_string(), bound))
}

/// A request-info for trial calls.
pub fn trial_request() -> RequestInfo {
    RequestInfo {
        request_id: "cllm-trial".into(),
        client_id: "cllm-trial".into(),
        endpoint: "/generate".into(),
        api: Api::Tgi,
        model: "cllm-trial".into(),
        prompt_tokens: 1,
        max_new_tokens: 1,
        requested_priority: None,
        headers: Vec::new(),
    }
}

/// How the trial request ended: refused after the trial, nothing generated.
fn trial_usage() -> Usage {
    let request = trial_request();
    Usage {
        request_id: request.request_id,
        client_id: request.client_id,
        prompt_tokens: request.prompt_tokens,
        generated_tokens: 0,
        outcome: Outcome::Failed,
    }
}

/// A health snapshot of an idle server, for trial calls.
pub fn trial_snapshot() -> HealthSnapshot {
    HealthSnapshot {
        queue_size: 0,
        max_queue_size: 1,
        running_sequences: 0,
        kv_blocks_used: 0,
        kv_blocks_total: 1,
        requests_per_second: 0.0,
        average_wait_ms: 0.0,
        p99_time_to_first_token_ms: 0.0,
        ms_since_last_step: 0,
        error_rate: 0.0,
    }
}

/// The names of everything `component` imports.
pub fn imports(engine: &PluginEngine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(&engine.engine)
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Everything `component` imports, as (name, the items of an imported instance).
fn import_items(engine: &PluginEngine, component: &Component) -> Vec<(String, Vec<String>)> {
    use wasmtime::component::types::ComponentItem;
    let ty = component.component_type();
    ty.imports(&engine.engine)
        .map(|(name, item)| {
            let items = match item.ty {
                ComponentItem::ComponentInstance(instance) => instance
                    .exports(&engine.engine)
                    .map(|(n, _)| n.to_string())
                    .collect(),
                _ => Vec::new(),
            };
            (name.to_string(), items)
        })
        .collect()
}

/// Compiles `bytes` (whose sha256 is `sha256`), or takes it from `cache`; the error is the
/// reason the file is refused.
pub fn compile(
    engine: &PluginEngine,
    cache: Option<&CompileCache>,
    file: &str,
    bytes: &[u8],
    sha256: &str,
    metrics: &Metrics,
) -> Result<Component, String> {
    let invalid = |e: wasmtime::Error| format!("not a valid WebAssembly component: {e:#}");
    let Some(cache) = cache else {
        return Component::new(&engine.engine, bytes).map_err(invalid);
    };
    let (component, result) = cache
        .compile(&engine.engine, bytes, sha256)
        .map_err(invalid)?;
    metrics
        .counter(
            "cllm_plugin_compile_cache_total",
            &[("result", result.as_str().to_string())],
        )
        .increment(1);
    tracing::debug!(plugin = %file, cache = result.as_str(), "plugin compiled");
    Ok(component)
}

/// Checks a compiled `component` (world, version, linking) and gives it its trial call; the
/// error is the reason the file is refused.
#[allow(clippy::too_many_arguments)]
pub fn load(
    engine: &Arc<PluginEngine>,
    component: &Component,
    file: &str,
    config: String,
    sha256: String,
    limits: &CallLimits,
    health_limits: &CallLimits,
    metrics: &Arc<Metrics>,
) -> Result<Plugin, String> {
    let (kind, version, bound) = detect_world(engine, component)?;
    if let Some(refusal) =
        super::wasi::refused_imports(&imports(engine, component), &engine.refused_imports)
    {
        return Err(refusal);
    }
    let instance_pre = engine
        .linker()
        .instantiate_pre(component)
        .map_err(|e| format!("cannot link: {e:#}"))?;
    let bad_world =
        |e: wasmtime::Error| format!("does not match the {} world: {e:#}", kind.as_str());
    let old = bound == (0, 1);
    let pre = match (kind, old) {
        (PluginKind::RateLimiter, false) => {
            Pre::Limiter(v2::limiter::RateLimiterPre::new(instance_pre).map_err(bad_world)?)
        }
        (PluginKind::Prioritizer, false) => {
            Pre::Prioritizer(v2::prioritizer::PrioritizerPre::new(instance_pre).map_err(bad_world)?)
        }
        (PluginKind::HealthChecker, false) => {
            Pre::Health(v2::health::HealthCheckerPre::new(instance_pre).map_err(bad_world)?)
        }
        (PluginKind::RateLimiter, true) => {
            Pre::LimiterV1(v1::limiter::RateLimiterPre::new(instance_pre).map_err(bad_world)?)
        }
        (PluginKind::Prioritizer, true) => Pre::PrioritizerV1(
            v1::prioritizer::PrioritizerPre::new(instance_pre).map_err(bad_world)?,
        ),
        (PluginKind::HealthChecker, true) => {
            Pre::HealthV1(v1::health::HealthCheckerPre::new(instance_pre).map_err(bad_world)?)
        }
    };
    let limits = if kind == PluginKind::HealthChecker {
        health_limits
    } else {
        limits
    };
    let plugin = Plugin::new(
        file.to_string(),
        kind,
        version,
        sha256,
        engine.clone(),
        pre,
        config,
        limits.clone(),
        metrics.clone(),
    );
    let imported = import_items(engine, component);
    let imported = imported
        .iter()
        .map(|(n, items)| (n.as_str(), items.clone()));
    let waits = super::wasi::waits_on_tokio(imported);
    if let Some(import) = &waits {
        tracing::info!(plugin = %file, "calls go to the blocking pool: the plugin imports {import}, which may wait on the async runtime");
    }
    let plugin = plugin.with_inline_calls(waits.is_none());
    let trial = match kind {
        // An allowed trial is followed by its `record-usage`, as every allowed request is.
        PluginKind::RateLimiter => {
            plugin
                .check(&trial_request())
                .and_then(|decision| match decision {
                    Decision::Allow => plugin.record_usage(&trial_usage()),
                    Decision::Reject(_) => Ok(()),
                })
        }
        PluginKind::Prioritizer => plugin.priority(&trial_request()).map(drop),
        PluginKind::HealthChecker => plugin.health(&trial_snapshot()).map(drop),
    };
    trial.map_err(|fault| format!("trial call failed: {}", plugin.describe_fault(fault)))?;
    Ok(plugin)
}
