//! `foreign-import`: a rate limiter that imports an interface cllm does not offer
//! (`cllm-test:foreign/vault`). cllm must refuse it at load, naming the import.

use cllm::policy::types::{Decision, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;

wit_bindgen::generate!({
    path: ["../../../wit/v0.1.0/policy.wit", "wit/world.wit"],
    world: "cllm-test:foreign/limiter-with-vault",
    generate_all,
});

struct Foreign;

impl Guest for Foreign {
    fn check(_request: RequestInfo) -> Decision {
        if cllm_test::foreign::vault::secret("key").is_empty() {
            return Decision::Allow;
        }
        Decision::Allow
    }

    fn record_usage(_usage: Usage) {}
}

export!(Foreign);
