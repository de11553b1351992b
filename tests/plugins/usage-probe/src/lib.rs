//! `usage-probe`: a 0.2.0 rate limiter that reports what cllm tells it. `record-usage` counts
//! each ending by outcome in `cllm:policy/counters` (hour windows, keys `usage-probe:{outcome}`
//! and `usage-probe:tokens`); a request whose id ends in `probe-usage` is rejected with those
//! counts and the request's `api` and `model` as the reason. Everything else is allowed.

use cllm::policy::counters;
use cllm::policy::types::{Api, Decision, Outcome, Rejection, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({ path: "../../../wit/policy.wit", world: "rate-limiter" });

const HOUR_MS: u64 = 3_600_000;
const OUTCOMES: [&str; 5] = ["finished", "stopped", "cancelled", "failed", "timed-out"];

fn count(name: &str, delta: i64) -> i64 {
    counters::incr(&format!("usage-probe:{name}"), delta, HOUR_MS).unwrap_or(-1)
}

struct UsageProbe;

impl Guest for UsageProbe {
    fn check(request: RequestInfo) -> Decision {
        if !request.request_id.ends_with("probe-usage") {
            return Decision::Allow;
        }
        let mut reason: Vec<String> = OUTCOMES
            .iter()
            .map(|o| format!("{o}={}", count(o, 0)))
            .collect();
        reason.push(format!("tokens={}", count("tokens", 0)));
        let api = match request.api {
            Api::Tgi => "tgi",
            Api::Openai => "openai",
        };
        reason.push(format!("api={api} model={}", request.model));
        Decision::Reject(Rejection {
            retry_after_ms: 1000,
            reason: reason.join(" "),
        })
    }

    fn record_usage(usage: Usage) {
        let name = match usage.outcome {
            Outcome::Finished => "finished",
            Outcome::Stopped => "stopped",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed-out",
        };
        count(name, 1);
        count("tokens", i64::from(usage.generated_tokens));
    }
}

export!(UsageProbe);
