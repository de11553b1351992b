//! Admission policy on the request path: plugin rate limiters (all must allow, in file-name
//! order) or the built-in limiter, then the plugin prioritizer or the request's own priority.

use super::params::ValidRequest;
use super::{AppState, RequestContext};
use crate::config::FailureMode;
use crate::error::ApiError;
use crate::plugins::bindings::{Decision, RequestInfo, Usage};
use crate::plugins::{Fault, Plugin};
use crate::tracker::Stage;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn request_info(ctx: &RequestContext, valid: &ValidRequest) -> RequestInfo {
    RequestInfo {
        request_id: ctx.request_id.clone(),
        client_id: ctx.client_id.clone(),
        endpoint: ctx.endpoint.to_string(),
        prompt_tokens: valid.prompt_ids.len() as u32,
        max_new_tokens: valid.params.max_new_tokens as u32,
        requested_priority: valid.requested_priority,
        headers: ctx.headers.clone(),
    }
}

fn rate_limited(
    state: &AppState,
    ctx: &RequestContext,
    retry_after: Duration,
    reason: String,
) -> ApiError {
    state
        .tracker
        .record_with(&ctx.request_id, Stage::RateLimited, reason.clone());
    state
        .metrics
        .counter("cllm_rate_limited_total", &[])
        .increment(1);
    ApiError::RateLimited {
        retry_after,
        reason,
    }
}

fn on_fault(mode: FailureMode, plugin: &Plugin, fault: Fault) -> Result<(), ApiError> {
    match (fault, mode) {
        // A disabled plugin is as good as absent.
        (Fault::Disabled, _) | (_, FailureMode::FailOpen) => Ok(()),
        (_, FailureMode::FailClosed) => Err(ApiError::PolicyUnavailable(format!(
            "{} failed ({})",
            plugin.file,
            fault.as_str()
        ))),
    }
}

/// Runs the rate limiters and the prioritizer; the request's queue priority.
pub fn admit(
    state: &AppState,
    ctx: &RequestContext,
    valid: &ValidRequest,
) -> Result<i32, ApiError> {
    let own_priority = valid.requested_priority.unwrap_or(0);
    let set = state.plugins.as_ref().map(|r| r.current());
    let limiters: Vec<&Arc<Plugin>> = set
        .iter()
        .flat_map(|s| s.limiters.iter())
        .filter(|p| !p.is_disabled())
        .collect();
    if limiters.is_empty() {
        if let Err(limited) = state.limiter.check(&ctx.client_id, Instant::now()) {
            let reason = format!("too many requests ({} limit)", limited.scope.as_str());
            return Err(rate_limited(state, ctx, limited.retry_after, reason));
        }
    }
    let info = (!limiters.is_empty() || set.as_ref().is_some_and(|s| s.prioritizer.is_some()))
        .then(|| request_info(ctx, valid));
    let mode = |f: fn(&crate::plugins::PluginRegistry) -> FailureMode| {
        state.plugins.as_deref().map_or(FailureMode::FailOpen, f)
    };
    if let Some(info) = &info {
        for plugin in &limiters {
            match plugin.check(info) {
                Ok(Decision::Allow) => {}
                Ok(Decision::Reject(r)) => {
                    let reason = format!("{} ({})", r.reason, plugin.file);
                    return Err(rate_limited(
                        state,
                        ctx,
                        Duration::from_millis(r.retry_after_ms),
                        reason,
                    ));
                }
                Err(fault) => on_fault(mode(|r| r.limiter_failure_mode), plugin, fault)?,
            }
        }
    }
    let prioritizer = set
        .as_ref()
        .and_then(|s| s.prioritizer.clone())
        .filter(|p| !p.is_disabled());
    match (prioritizer, &info) {
        (Some(plugin), Some(info)) => match plugin.priority(info) {
            Ok(priority) => Ok(priority),
            Err(fault) => {
                on_fault(mode(|r| r.priority_failure_mode), &plugin, fault).map(|()| own_priority)
            }
        },
        _ => Ok(own_priority),
    }
}

/// Tells the plugin rate limiters what a finished request used.
pub fn record_usage(
    state: &AppState,
    ctx: &RequestContext,
    prompt_tokens: usize,
    generated_tokens: usize,
) {
    let Some(registry) = &state.plugins else {
        return;
    };
    let set = registry.current();
    if set.limiters.is_empty() {
        return;
    }
    let usage = Usage {
        request_id: ctx.request_id.clone(),
        client_id: ctx.client_id.clone(),
        prompt_tokens: prompt_tokens as u32,
        generated_tokens: generated_tokens as u32,
    };
    for plugin in set.limiters.iter().filter(|p| !p.is_disabled()) {
        // A fault is counted by the plugin itself; usage reporting never fails a request.
        let _ = plugin.record_usage(&usage);
    }
}
