//! `queue-health`: a health check for cllm (world `health-checker`).
//!
//! The verdict, worst first:
//!
//! - `unhealthy` when the scheduler has not completed a step for `stall_ms` or more while it
//!   has work (queued or running sequences): it is stuck;
//! - `degraded` when the queue is at least `queue_fraction` full, or the p99 time to first
//!   token is at least `p99_ttft_ms`;
//! - `healthy` otherwise.
//!
//! The message gives the numbers behind the verdict.
//!
//! # Config (sidecar `queue_health.json`)
//!
//! | key              | default | meaning                                               |
//! |------------------|---------|-------------------------------------------------------|
//! | `queue_fraction` | `0.8`   | queue fill (size / capacity) that counts as degraded   |
//! | `p99_ttft_ms`    | `2000`  | p99 time to first token (ms) that counts as degraded   |
//! | `stall_ms`       | `5000`  | ms without a scheduler step (with work) = unhealthy    |
//!
//! Example: `{"queue_fraction": 0.9, "p99_ttft_ms": 1500, "stall_ms": 10000}`. The config is
//! read once, on the first call. Invalid JSON or unknown keys are logged as an error and the
//! defaults are used.

use std::sync::OnceLock;

use cllm::policy::host::{self, LogLevel};
use cllm::policy::types::{HealthReport, HealthSnapshot, HealthStatus};
use exports::cllm::policy::health_check::Guest;
use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit/policy.wit", world: "health-checker" });

/// The plugin's thresholds, from its sidecar JSON.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// Queue fill fraction at or above which the server is degraded.
    queue_fraction: f64,
    /// p99 time to first token (ms) at or above which the server is degraded.
    p99_ttft_ms: f64,
    /// Time without a scheduler step (ms), with work pending, at or above which it is unhealthy.
    stall_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue_fraction: 0.8,
            p99_ttft_ms: 2000.0,
            stall_ms: 5000,
        }
    }
}

impl Config {
    /// Parses the config JSON (empty text means the defaults).
    fn parse(text: &str) -> Result<Config, serde_json::Error> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_json::from_str(text)
    }

    /// Reads the config from the host, falling back to the defaults (with an error logged)
    /// when it is not valid.
    fn load() -> Config {
        Config::parse(&host::config()).unwrap_or_else(|err| {
            host::log(
                LogLevel::Error,
                &format!("bad config ({err}); using the defaults"),
            );
            Config::default()
        })
    }

    /// Judges `s` by the rules in the crate doc.
    fn judge(&self, s: &HealthSnapshot) -> HealthReport {
        let busy = s.queue_size > 0 || s.running_sequences > 0;
        if busy && s.ms_since_last_step >= self.stall_ms {
            return HealthReport {
                status: HealthStatus::Unhealthy,
                message: format!(
                    "scheduler stalled: no step for {} ms (limit {} ms) with {} queued, {} running",
                    s.ms_since_last_step, self.stall_ms, s.queue_size, s.running_sequences
                ),
            };
        }

        let mut problems = Vec::new();
        if s.max_queue_size > 0 {
            let fill = f64::from(s.queue_size) / f64::from(s.max_queue_size);
            if fill >= self.queue_fraction {
                problems.push(format!(
                    "queue {}/{} ({:.0}%) >= {:.0}%",
                    s.queue_size,
                    s.max_queue_size,
                    fill * 100.0,
                    self.queue_fraction * 100.0
                ));
            }
        }
        if s.p99_time_to_first_token_ms >= self.p99_ttft_ms {
            problems.push(format!(
                "p99 TTFT {:.0} ms >= {:.0} ms",
                s.p99_time_to_first_token_ms, self.p99_ttft_ms
            ));
        }
        if !problems.is_empty() {
            return HealthReport {
                status: HealthStatus::Degraded,
                message: problems.join("; "),
            };
        }

        HealthReport {
            status: HealthStatus::Healthy,
            message: format!(
                "queue {}/{}, p99 TTFT {:.0} ms, last step {} ms ago",
                s.queue_size, s.max_queue_size, s.p99_time_to_first_token_ms, s.ms_since_last_step
            ),
        }
    }
}

/// The thresholds, read on the first call.
static CONFIG: OnceLock<Config> = OnceLock::new();

/// The exported `health-check` interface.
struct QueueHealth;

impl Guest for QueueHealth {
    fn check(snapshot: HealthSnapshot) -> HealthReport {
        CONFIG.get_or_init(Config::load).judge(&snapshot)
    }
}

export!(QueueHealth);

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(queue: u32, running: u32, p99: f64, since_step: u64) -> HealthSnapshot {
        HealthSnapshot {
            queue_size: queue,
            max_queue_size: 100,
            running_sequences: running,
            kv_blocks_used: 0,
            kv_blocks_total: 100,
            requests_per_second: 0.0,
            average_wait_ms: 0.0,
            p99_time_to_first_token_ms: p99,
            ms_since_last_step: since_step,
            error_rate: 0.0,
        }
    }

    fn verdict(s: HealthSnapshot) -> (HealthStatus, String) {
        let report = Config::default().judge(&s);
        (report.status, report.message)
    }

    #[test]
    fn verdicts() {
        let (status, message) = verdict(snapshot(3, 2, 120.0, 5));
        assert_eq!(status, HealthStatus::Healthy);
        assert_eq!(message, "queue 3/100, p99 TTFT 120 ms, last step 5 ms ago");

        let (status, message) = verdict(snapshot(90, 2, 2500.0, 5));
        assert_eq!(status, HealthStatus::Degraded);
        assert_eq!(
            message,
            "queue 90/100 (90%) >= 80%; p99 TTFT 2500 ms >= 2000 ms"
        );

        let (status, message) = verdict(snapshot(3, 0, 0.0, 6200));
        assert_eq!(status, HealthStatus::Unhealthy);
        assert_eq!(
            message,
            "scheduler stalled: no step for 6200 ms (limit 5000 ms) with 3 queued, 0 running"
        );

        // An idle scheduler is allowed to sleep.
        assert_eq!(
            verdict(snapshot(0, 0, 0.0, 60_000)).0,
            HealthStatus::Healthy
        );
    }

    #[test]
    fn config() {
        let config = Config::parse(r#"{"stall_ms": 100}"#).unwrap();
        assert_eq!((config.stall_ms, config.queue_fraction), (100, 0.8));
        assert!(Config::parse(r#"{"stall": 100}"#).is_err());
    }
}
