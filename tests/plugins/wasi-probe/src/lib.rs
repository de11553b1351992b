//! `wasi-probe`: a rate limiter that uses WASI the way ordinary Rust code does, to test what
//! cllm gives plugins. What `check` does depends on the request id's suffix:
//! - `probe-env`: rejects, with a reason that reports what the plugin could see: environment
//!   variables, arguments, a filesystem listing, a TCP connection, the wall clock, the monotonic
//!   clock and two random numbers;
//! - `probe-exit`: calls `exit(0)` (cllm must count a fault);
//! - `probe-sleep`: sleeps 10 s (cllm must cut it off as a fault at once);
//! - anything else: prints a line to stdout and one to stderr, and allows.

use cllm::policy::types::{Decision, Rejection, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

wit_bindgen::generate!({ path: "../../../wit/policy.wit", world: "rate-limiter" });

struct Probe;

/// A random u64 from WASI randomness (the standard library seeds hash maps from it).
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u8(0);
    hasher.finish()
}

fn report() -> String {
    let env = std::env::vars().count();
    let args = std::env::args().count();
    let fs = match std::fs::read_dir("/") {
        Ok(_) => "open",
        Err(_) => "denied",
    };
    let net = match std::net::TcpStream::connect("127.0.0.1:80") {
        Ok(_) => "open",
        Err(_) => "denied",
    };
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let start = Instant::now();
    let mut spin = 0u64;
    while start.elapsed() < Duration::from_micros(200) {
        spin += 1;
    }
    let mono = if spin > 0 { "advances" } else { "stuck" };
    format!(
        "env={env} args={args} fs={fs} net={net} wall={wall} mono={mono} rand={} rand={}",
        random(),
        random()
    )
}

impl Guest for Probe {
    fn check(request: RequestInfo) -> Decision {
        let id = request.request_id.as_str();
        if id.ends_with("probe-env") {
            return Decision::Reject(Rejection {
                retry_after_ms: 1000,
                reason: report(),
            });
        }
        if id.ends_with("probe-exit") {
            std::process::exit(0);
        }
        if id.ends_with("probe-sleep") {
            std::thread::sleep(Duration::from_secs(10));
        }
        println!("probe check {id}");
        eprintln!("probe stderr {id}");
        Decision::Allow
    }

    fn record_usage(_usage: Usage) {}
}

export!(Probe);
