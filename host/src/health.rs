//! `/health`: component states, live numbers, and an overall verdict that never waits on the
//! queue or the model.

use crate::scheduler::SchedulerStats;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Degraded,
    Unhealthy,
}

/// Completed requests of the last minute, for requests/s and average response time.
pub struct RecentRequests {
    window: Duration,
    done: Mutex<VecDeque<(Instant, Duration, bool)>>,
}

impl RecentRequests {
    pub fn new(window: Duration) -> Self {
        RecentRequests {
            window,
            done: Mutex::new(VecDeque::new()),
        }
    }

    /// Records a finished request; `failed` for server-side failures (5xx).
    pub fn record(&self, took: Duration, failed: bool) {
        let now = Instant::now();
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.push_back((now, took, failed));
        while done
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > self.window)
        {
            done.pop_front();
        }
    }

    /// (requests per second, average response time in seconds, error rate) over the window.
    pub fn rates(&self) -> (f64, f64, f64) {
        let now = Instant::now();
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let recent: Vec<(Duration, bool)> = done
            .iter()
            .filter(|(at, _, _)| now.duration_since(*at) <= self.window)
            .map(|(_, took, failed)| (*took, *failed))
            .collect();
        if recent.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        let n = recent.len() as f64;
        let avg = recent.iter().map(|(t, _)| t.as_secs_f64()).sum::<f64>() / n;
        let errors = recent.iter().filter(|(_, failed)| *failed).count() as f64;
        (n / self.window.as_secs_f64(), avg, errors / n)
    }
}

/// Runs every health-check plugin on `snapshot`: (file, status, message) for each enforcing
/// one. A plugin that faults reports `degraded` with the fault, so a broken check is visible
/// but not fatal. Shadow plugins are called and their verdicts counted and logged, not
/// returned.
pub fn plugin_verdicts(
    registry: &crate::plugins::PluginRegistry,
    snapshot: &crate::plugins::bindings::HealthSnapshot,
) -> Vec<(String, Status, String)> {
    use crate::plugins::bindings::{health_status_name, HealthStatus};
    let set = registry.current();
    let (shadow, enforcing): (Vec<_>, Vec<_>) = set
        .health
        .iter()
        .filter(|p| !p.is_disabled())
        .partition(|p| p.shadow);
    for plugin in shadow {
        if let Ok(report) = plugin.health(snapshot) {
            let decision = health_status_name(report.status);
            plugin.count_decision(decision);
            tracing::debug!(plugin = %plugin.file, decision, message = %report.message, "shadow health check");
        }
    }
    enforcing
        .into_iter()
        .map(|plugin| match plugin.health(snapshot) {
            Ok(report) => {
                plugin.count_decision(health_status_name(report.status));
                let status = match report.status {
                    HealthStatus::Healthy => Status::Ok,
                    HealthStatus::Degraded => Status::Degraded,
                    HealthStatus::Unhealthy => Status::Unhealthy,
                };
                (plugin.file.clone(), status, report.message)
            }
            Err(fault) => (
                plugin.file.clone(),
                Status::Degraded,
                format!("health check failed: {}", fault.as_str()),
            ),
        })
        .collect()
}

/// The scheduler's verdict: dead or stalled with work waiting is unhealthy.
pub fn scheduler_status(
    stats: &SchedulerStats,
    has_work: bool,
    stall: Duration,
) -> (Status, String) {
    if !stats.alive.load(Ordering::SeqCst) {
        return (Status::Unhealthy, "scheduler loop is not running".into());
    }
    let since = stats.ms_since_last_tick();
    if has_work && since > stall.as_millis() as u64 {
        return (
            Status::Unhealthy,
            format!("scheduler loop stalled for {since} ms with work waiting"),
        );
    }
    (Status::Ok, "running".into())
}
