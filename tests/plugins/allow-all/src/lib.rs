//! `allow-all`: a rate limiter that allows every request. It counts the calls it gets (the
//! state stays in the instance between calls) and logs nothing: a baseline for the cost of a
//! plugin call.

use std::sync::atomic::{AtomicU64, Ordering};

use cllm::policy::types::{Decision, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({ path: "../../../wit/v0.1.0/policy.wit", world: "rate-limiter" });

/// Calls to `check` so far.
static CHECKS: AtomicU64 = AtomicU64::new(0);
/// Calls to `record-usage` so far.
static USAGES: AtomicU64 = AtomicU64::new(0);

/// Allows everything.
struct AllowAll;

impl Guest for AllowAll {
    fn check(_request: RequestInfo) -> Decision {
        CHECKS.fetch_add(1, Ordering::Relaxed);
        Decision::Allow
    }

    fn record_usage(_usage: Usage) {
        USAGES.fetch_add(1, Ordering::Relaxed);
    }
}

export!(AllowAll);
