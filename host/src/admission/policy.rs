//! The policy half of admission: plugin rate limiters (all must allow, in file-name order) or
//! the built-in limiter, then the plugin prioritizer or the request's own priority; and, when
//! a request ends, telling the limiters what it used.

use super::{Outcome, Ticket};
use crate::admission::rate_limiter::RateLimiter;
use crate::config::FailureMode;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::plugins::bindings::{Api, Decision, RequestInfo, Usage};
use crate::plugins::{Fault, Plugin, PluginRegistry, PluginSet};
use crate::tracker::{RequestTracker, Stage};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the policy stage consults.
pub struct Policy {
    pub limiter: RateLimiter,
    pub plugins: Option<Arc<PluginRegistry>>,
    pub tracker: Arc<RequestTracker>,
    pub rate_limited: metrics::Counter,
    /// The served model's id, as plugins see it in `request-info.model`.
    pub model: String,
}

impl Policy {
    pub fn new(
        limiter: RateLimiter,
        plugins: Option<Arc<PluginRegistry>>,
        tracker: Arc<RequestTracker>,
        metrics: &Metrics,
        model: String,
    ) -> Policy {
        Policy {
            model,
            limiter,
            plugins,
            tracker,
            rate_limited: metrics.counter("cllm_rate_limited_total", &[]),
        }
    }

    fn request_info(&self, ticket: &Ticket) -> RequestInfo {
        let sum = |f: fn(&super::SequenceSpec) -> usize| {
            ticket
                .sequences
                .iter()
                .map(f)
                .sum::<usize>()
                .min(u32::MAX as usize) as u32
        };
        RequestInfo {
            request_id: ticket.request_id.clone(),
            client_id: ticket.client_id.clone(),
            endpoint: ticket.endpoint.to_string(),
            api: if ticket.endpoint.starts_with("/v1/") {
                Api::Openai
            } else {
                Api::Tgi
            },
            model: self.model.clone(),
            prompt_tokens: sum(|s| s.prompt_ids.len()),
            max_new_tokens: sum(|s| s.params.max_new_tokens),
            requested_priority: ticket.requested_priority,
            headers: ticket.headers.clone(),
        }
    }

    pub(super) fn refuse(
        &self,
        ticket: &Ticket,
        retry_after: Duration,
        reason: String,
    ) -> ApiError {
        self.tracker
            .record_with(&ticket.request_id, Stage::RateLimited, reason.clone());
        self.rate_limited.increment(1);
        ApiError::RateLimited {
            retry_after,
            reason,
        }
    }

    fn mode(&self, pick: fn(&PluginRegistry) -> FailureMode) -> FailureMode {
        self.plugins.as_deref().map_or(FailureMode::FailOpen, pick)
    }

    /// The plugins loaded now (`None` when plugins are off). One snapshot serves both the
    /// choice of thread ([`Policy::needs_blocking_pool`]) and the calls it was made for, so a
    /// hot swap in between cannot send a plugin that must stay off the async workers onto one.
    pub fn plugins_now(&self) -> Option<Arc<PluginSet>> {
        self.plugins.as_ref().map(|registry| registry.current())
    }

    /// Whether `plugins` holds a plugin that [`Policy::decide`] would call and that may not
    /// be called on an async worker (it imports WASI calls that block on a tokio runtime):
    /// those calls then go to the blocking pool. Plugins that import no such call run
    /// inline, on the worker, within their call deadline.
    pub fn needs_blocking_pool(plugins: Option<&PluginSet>) -> bool {
        plugins.is_some_and(|set| {
            let off = |p: &Arc<Plugin>| !p.calls_inline();
            set.limiters.iter().any(off)
                || set.prioritizer.iter().any(off)
                || set.shadow_prioritizers.iter().any(off)
        })
    }

    /// Runs the rate limiters and the prioritizer of `set` (from [`Policy::plugins_now`]):
    /// the request's queue priority, and the limiters (enforcing or shadow) whose `check`
    /// allowed it, which owe a `record-usage` when it ends (see [`Policy::record_usage`]).
    /// Shadow plugins run first, on every request that gets here, and only count and log. On
    /// a refusal the allowing limiters have been told already.
    pub fn decide(
        &self,
        ticket: &Ticket,
        set: Option<&PluginSet>,
    ) -> Result<(i32, Vec<Arc<Plugin>>), ApiError> {
        let own_priority = ticket.requested_priority.unwrap_or(0);
        let live = |p: &&Arc<Plugin>| !p.is_disabled();
        let (shadow, limiters): (Vec<&Arc<Plugin>>, Vec<&Arc<Plugin>>) = set
            .iter()
            .flat_map(|s| s.limiters.iter())
            .filter(live)
            .partition(|p| p.shadow);
        let shadow_prioritizers: Vec<&Arc<Plugin>> = set
            .iter()
            .flat_map(|s| s.shadow_prioritizers.iter())
            .filter(live)
            .collect();
        let prioritizer = set
            .as_ref()
            .and_then(|s| s.prioritizer.clone())
            .filter(|p| !p.is_disabled());
        let any_plugin = !(limiters.is_empty()
            && prioritizer.is_none()
            && shadow.is_empty()
            && shadow_prioritizers.is_empty());
        let info = any_plugin.then(|| self.request_info(ticket));
        let mut allowed: Vec<Arc<Plugin>> = Vec::new();
        if let Some(info) = &info {
            for plugin in shadow {
                if shadow_check(plugin, info) {
                    allowed.push(plugin.clone());
                }
            }
            for plugin in shadow_prioritizers {
                if let Ok(priority) = plugin.priority(info) {
                    plugin.count_decision("priority");
                    tracing::debug!(plugin = %plugin.file, request_id = %info.request_id, priority, "shadow prioritizer");
                }
            }
        }
        // Without an enforcing plugin limiter, the built-in one applies.
        let built_in = if limiters.is_empty() {
            self.limiter
                .check(&ticket.client_id, Instant::now())
                .map_err(|limited| {
                    let reason = format!("too many requests ({} limit)", limited.scope.as_str());
                    self.refuse(ticket, limited.retry_after, reason)
                })
        } else {
            Ok(())
        };
        let verdict = built_in.and_then(|()| match &info {
            None => Ok(own_priority),
            Some(info) => {
                let (limiters, own) = (&limiters[..], own_priority);
                self.enforce(ticket, info, limiters, prioritizer, own, &mut allowed)
            }
        });
        match verdict {
            Ok(priority) => Ok((priority, allowed)),
            Err(refused) => {
                // A limiter that allowed the request hears how it ended even when a later
                // stage refused it: as failed, with nothing generated (so a plugin that counts
                // requests in flight from `check` to `record-usage` stays balanced).
                if let Some(info) = info.filter(|_| !allowed.is_empty()) {
                    let usage = Usage {
                        request_id: info.request_id,
                        client_id: info.client_id,
                        prompt_tokens: info.prompt_tokens,
                        generated_tokens: 0,
                        outcome: Outcome::Refused.for_plugins(),
                    };
                    self.record_usage(&usage, Outcome::Refused, &allowed);
                }
                Err(refused)
            }
        }
    }

    /// The enforcing limiters in turn, then the prioritizer: the request's queue priority
    /// (`own_priority` without a prioritizer, or when it fails open), or the refusal.
    /// `allowed` collects the limiters whose `check` allowed it.
    fn enforce(
        &self,
        ticket: &Ticket,
        info: &RequestInfo,
        limiters: &[&Arc<Plugin>],
        prioritizer: Option<Arc<Plugin>>,
        own_priority: i32,
        allowed: &mut Vec<Arc<Plugin>>,
    ) -> Result<i32, ApiError> {
        for &plugin in limiters {
            match plugin.check(info) {
                Ok(Decision::Allow) => {
                    plugin.count_decision("allow");
                    allowed.push(plugin.clone());
                }
                Ok(Decision::Reject(r)) => {
                    plugin.count_decision("reject");
                    let reason = format!("{} ({})", r.reason, plugin.file);
                    let wait = Duration::from_millis(r.retry_after_ms);
                    return Err(self.refuse(ticket, wait, reason));
                }
                Err(fault) => on_fault(self.mode(|r| r.limiter_failure_mode), plugin, fault)?,
            }
        }
        match prioritizer {
            Some(plugin) => match plugin.priority(info) {
                Ok(priority) => {
                    plugin.count_decision("priority");
                    Ok(priority)
                }
                Err(fault) => on_fault(self.mode(|r| r.priority_failure_mode), &plugin, fault)
                    .map(|()| own_priority),
            },
            None => Ok(own_priority),
        }
    }

    /// Tells `limiters`, those whose `check` allowed the request (from [`Policy::decide`]),
    /// what it used, however it ended; a limiter disabled since is not called.
    pub fn record_usage(&self, usage: &Usage, outcome: Outcome, limiters: &[Arc<Plugin>]) {
        tracing::debug!(
            request_id = usage.request_id,
            outcome = outcome.as_str(),
            prompt_tokens = usage.prompt_tokens,
            generated_tokens = usage.generated_tokens,
            "usage"
        );
        for plugin in limiters.iter().filter(|p| !p.is_disabled()) {
            // A fault is counted by the plugin itself; usage reporting never fails a request.
            let _ = plugin.record_usage(usage);
        }
    }
}

/// A shadow limiter's verdict, counted and logged; a fault is the plugin's own business (it
/// counts it) and never the request's. True when it allowed the request.
fn shadow_check(plugin: &Plugin, info: &RequestInfo) -> bool {
    match plugin.check(info) {
        Ok(Decision::Allow) => {
            plugin.count_decision("allow");
            true
        }
        Ok(Decision::Reject(r)) => {
            plugin.count_decision("reject");
            tracing::info!(
                plugin = %plugin.file,
                request_id = %info.request_id,
                reason = %r.reason,
                retry_after_ms = r.retry_after_ms,
                "shadow limiter would reject (not enforced)"
            );
            false
        }
        Err(_) => false,
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
