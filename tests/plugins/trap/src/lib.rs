//! `trap`: a rate limiter whose `check` executes the `unreachable` instruction, so every call
//! traps. The plugin host must treat it as a fault. `record-usage` is harmless.

use cllm::policy::types::{Decision, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({ path: "../../../wit/policy.wit", world: "rate-limiter" });

/// Traps in `check`.
struct Trap;

impl Guest for Trap {
    fn check(request: RequestInfo) -> Decision {
        // Behave for cllm's load-time trial call, so the plugin becomes active and misbehaves
        // on real requests (a plugin that fails its trial is refused, never active).
        if request.request_id == "cllm-trial" {
            return Decision::Allow;
        }
        // The same trap a Rust panic ends in (with `panic = "abort"`), without the panic message.
        core::arch::wasm32::unreachable()
    }

    fn record_usage(_usage: Usage) {}
}

export!(Trap);
