//! `shared-limit`: a per-client limit that holds across every cllm replica (world
//! `rate-limiter`, `cllm:policy@0.2.0`).
//!
//! Each client (the request's `client-id`) may send `max_requests` requests and have
//! `max_tokens` tokens generated for it per window of `window_ms`. The counts live in
//! `cllm:policy/counters`: in Redis when the operator sets `plugins.shared_state.redis_url`
//! (then every replica using that Redis counts together), else in the server's own memory.
//! Windows are fixed and aligned to the Unix epoch, so all replicas agree on them.
//!
//! A request is counted when it is checked (also when it is then rejected, so a client that
//! keeps retrying stays limited); generated tokens are added from `record-usage`, which cllm
//! calls for every admitted request however it ends (a cancelled stream is charged what it got).
//!
//! # Config (sidecar `shared_limit.json`)
//!
//! | key            | default        | meaning                                             |
//! |----------------|----------------|-----------------------------------------------------|
//! | `window_ms`    | `60000`        | window length in ms (min 1)                         |
//! | `max_requests` | `60`           | requests per client per window; `0` = no limit     |
//! | `max_tokens`   | `0`            | generated tokens per client per window; `0` = none |
//! | `key_prefix`   | `shared-limit` | counter key prefix (share it between replicas)      |
//!
//! When the counter store fails and the operator chose `failure_mode: fail_closed`, the plugin
//! rejects (retry after one second); with `fail_open` (the default) cllm answers as if the
//! window were empty and requests pass.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use cllm::policy::counters;
use cllm::policy::host::{self, LogLevel};
use cllm::policy::types::{Decision, Rejection, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;
use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit/policy.wit", world: "rate-limiter" });

/// The plugin's settings, from its sidecar JSON.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    window_ms: u64,
    max_requests: i64,
    max_tokens: i64,
    key_prefix: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window_ms: 60_000,
            max_requests: 60,
            max_tokens: 0,
            key_prefix: "shared-limit".into(),
        }
    }
}

/// The config, read once; invalid JSON is logged and the defaults apply.
fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = host::config();
        if text.trim().is_empty() {
            return Config::default();
        }
        let mut config: Config = serde_json::from_str(&text).unwrap_or_else(|err| {
            host::log(
                LogLevel::Error,
                &format!("invalid config, using defaults: {err}"),
            );
            Config::default()
        });
        config.window_ms = config.window_ms.max(1);
        config
    })
}

/// Milliseconds until the current window ends.
fn window_left_ms(window_ms: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    window_ms - now % window_ms
}

fn reject(retry_after_ms: u64, reason: String) -> Decision {
    Decision::Reject(Rejection {
        retry_after_ms,
        reason,
    })
}

struct SharedLimit;

impl Guest for SharedLimit {
    fn check(request: RequestInfo) -> Decision {
        let c = config();
        let client = &request.client_id;
        let wait = window_left_ms(c.window_ms);
        let count = |kind: &str, delta: i64| {
            counters::incr(
                &format!("{}:{kind}:{client}", c.key_prefix),
                delta,
                c.window_ms,
            )
        };
        if c.max_requests > 0 {
            match count("req", 1) {
                Ok(n) if n > c.max_requests => {
                    return reject(
                        wait,
                        format!("{} requests per {} ms", c.max_requests, c.window_ms),
                    )
                }
                Ok(_) => {}
                Err(e) => return reject(1000, format!("limit store unavailable: {e}")),
            }
        }
        if c.max_tokens > 0 {
            match count("tok", 0) {
                Ok(n) if n >= c.max_tokens => {
                    return reject(
                        wait,
                        format!("{} generated tokens per {} ms", c.max_tokens, c.window_ms),
                    )
                }
                Ok(_) => {}
                Err(e) => return reject(1000, format!("limit store unavailable: {e}")),
            }
        }
        Decision::Allow
    }

    fn record_usage(usage: Usage) {
        let c = config();
        if c.max_tokens > 0 && usage.generated_tokens > 0 {
            let key = format!("{}:tok:{}", c.key_prefix, usage.client_id);
            // A store failure loses this charge; cllm counts the error in its metrics.
            let _ = counters::incr(&key, i64::from(usage.generated_tokens), c.window_ms);
        }
    }
}

export!(SharedLimit);
