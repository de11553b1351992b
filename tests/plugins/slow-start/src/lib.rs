//! `slow-start`: a rate limiter whose first call is slow (100 ms of work, like a cold
//! interpreter setting itself up) and whose later calls are fast: it rejects the client
//! `blocked` and allows everyone else. The load-time trial call must not be held to the
//! per-call deadline of a warm instance, or such a plugin is refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cllm::policy::types::{Decision, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({ path: "../../../wit/policy.wit", world: "rate-limiter" });

/// Set once the first call's set-up is done.
static READY: AtomicBool = AtomicBool::new(false);

/// How long the first call works.
const SET_UP: Duration = Duration::from_millis(100);

struct SlowStart;

impl Guest for SlowStart {
    fn check(request: RequestInfo) -> Decision {
        if !READY.swap(true, Ordering::Relaxed) {
            let started = Instant::now();
            let mut spins = 0u64;
            while started.elapsed() < SET_UP {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        }
        if request.client_id == "blocked" {
            Decision::Reject(cllm::policy::types::Rejection {
                retry_after_ms: 1000,
                reason: "blocked".into(),
            })
        } else {
            Decision::Allow
        }
    }

    fn record_usage(_usage: Usage) {}
}

export!(SlowStart);
