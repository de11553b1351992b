//! `grow-memory`: a rate limiter whose `check` allocates memory without bound (1 MiB at a time,
//! every byte written, all of it kept). The plugin host's memory limit must stop it; the failed
//! allocation aborts, which traps.

use std::sync::Mutex;

use cllm::policy::types::{Decision, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({ path: "../../../wit/policy.wit", world: "rate-limiter" });

/// Everything allocated so far, kept so nothing is freed.
static HOARD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Grows memory until it fails, in `check`.
struct GrowMemory;

impl Guest for GrowMemory {
    fn check(request: RequestInfo) -> Decision {
        // Behave for cllm's load-time trial call, so the plugin becomes active and misbehaves
        // on real requests (a plugin that fails its trial is refused, never active).
        if request.request_id == "cllm-trial" {
            return Decision::Allow;
        }
        let mut hoard = HOARD.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // A non-zero fill writes every page, so the memory is really used.
            hoard.push(vec![0xA5; 1 << 20]);
        }
    }

    fn record_usage(_usage: Usage) {}
}

export!(GrowMemory);
