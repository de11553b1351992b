//! `future-major`: an allow-everything rate limiter built against `cllm:policy@1.0.0` (a copy of
//! the contract in this crate's `wit/` with the major version raised). The plugin host, which
//! speaks `0.1.x`, must refuse to load it.

use cllm::policy::types::{Decision, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({ path: "wit/policy.wit", world: "rate-limiter" });

/// Allows every request.
struct FutureMajor;

impl Guest for FutureMajor {
    fn check(_request: RequestInfo) -> Decision {
        Decision::Allow
    }

    fn record_usage(_usage: Usage) {}
}

export!(FutureMajor);
