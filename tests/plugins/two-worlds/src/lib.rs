//! `two-worlds`: a component exporting both `rate-limit` and `priority`. The plugin host must
//! refuse it, naming both, rather than load it as whichever export it finds first.

use cllm::policy::types::{Decision, RequestInfo, Usage};

wit_bindgen::generate!({ path: "wit", world: "two", generate_all });

/// Allows everything, at priority 0.
struct Two;

impl exports::cllm::policy::rate_limit::Guest for Two {
    fn check(_request: RequestInfo) -> Decision {
        Decision::Allow
    }

    fn record_usage(_usage: Usage) {}
}

impl exports::cllm::policy::priority::Guest for Two {
    fn priority(_request: RequestInfo) -> i32 {
        0
    }
}

export!(Two);
