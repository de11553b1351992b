//! `printer`: a rate limiter that prints the way ordinary Rust code does and touches nothing
//! else of WASI, so cllm calls it inline on the request's async worker. What `check` does
//! depends on the request id's suffix:
//! - `probe-sleep`: sleeps 10 s (cllm must cut it off as a fault at once);
//! - anything else: prints a line to stdout and one to stderr, and allows.
//!
//! `record_usage` prints a line too.

use cllm::policy::types::{Decision, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;
use std::io::Write;
use std::time::Duration;

wit_bindgen::generate!({ path: "../../../wit/policy.wit", world: "rate-limiter" });

struct Printer;

impl Guest for Printer {
    fn check(request: RequestInfo) -> Decision {
        let id = request.request_id.as_str();
        if id.ends_with("probe-sleep") {
            std::thread::sleep(Duration::from_secs(10));
        }
        println!("printer check {id}");
        eprintln!("printer stderr {id}");
        let _ = std::io::stdout().flush();
        Decision::Allow
    }

    fn record_usage(usage: Usage) {
        println!(
            "printer usage {} {}",
            usage.request_id, usage.generated_tokens
        );
    }
}

export!(Printer);
