//! `deny-all`: a rate limiter that rejects every request with `retry-after-ms` 2000 and the
//! reason `"deny-all plugin"`.

use cllm::policy::types::{Decision, Rejection, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({ path: "../../../wit/policy.wit", world: "rate-limiter" });

/// Rejects everything.
struct DenyAll;

impl Guest for DenyAll {
    fn check(_request: RequestInfo) -> Decision {
        Decision::Reject(Rejection {
            retry_after_ms: 2000,
            reason: "deny-all plugin".to_owned(),
        })
    }

    fn record_usage(_usage: Usage) {}
}

export!(DenyAll);
