//! `loop-forever`: a rate limiter whose `check` never returns. The plugin host must cut it off
//! at its deadline (and treat it as a fault).

use cllm::policy::types::{Decision, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({ path: "../../../wit/policy.wit", world: "rate-limiter" });

/// Spins forever in `check`.
struct LoopForever;

impl Guest for LoopForever {
    fn check(request: RequestInfo) -> Decision {
        // Behave for cllm's load-time trial call, so the plugin becomes active and misbehaves
        // on real requests (a plugin that fails its trial is refused, never active).
        if request.request_id == "cllm-trial" {
            return Decision::Allow;
        }
        let mut spins = 0u64;
        loop {
            // `black_box` keeps the loop a real loop the optimizer cannot reason about.
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
    }

    fn record_usage(_usage: Usage) {}
}

export!(LoopForever);
