//! `token-bucket`: a per-client rate limiter for cllm (world `rate-limiter`).
//!
//! Every client (the request's `client-id`) gets a token bucket: it holds at most `burst`
//! tokens, refills at `rate_per_sec` tokens a second, and each request takes one. A request
//! that finds the bucket empty is rejected with the time until the next token.
//!
//! Optionally, each client also gets a budget of generated tokens per minute, charged from
//! `record-usage`: once a client's generated tokens in the current minute reach the budget,
//! its requests are rejected until the minute rolls over. Minutes are fixed windows of the
//! host's monotonic clock (`now-ms / 60000`), shared by all clients.
//!
//! # Config (sidecar `token_bucket.json`)
//!
//! | key                 | default | meaning                                                   |
//! |---------------------|---------|-----------------------------------------------------------|
//! | `rate_per_sec`      | `5`     | requests per second per client (refill rate); `0` = off   |
//! | `burst`             | `10`    | bucket size: requests a client may send at once (min 1)    |
//! | `tokens_per_minute` | `0`     | generated tokens per client per minute; `0` = off         |
//! | `max_clients`       | `10000` | clients tracked at once; idle ones are evicted first      |
//!
//! Example: `{"rate_per_sec": 5, "burst": 10, "tokens_per_minute": 20000}`. The config is read
//! once, on the first call. Invalid JSON or unknown keys are logged as an error and the
//! defaults are used.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cllm::policy::host::{self, LogLevel};
use cllm::policy::types::{Decision, Rejection, RequestInfo, Usage};
use exports::cllm::policy::rate_limit::Guest;
use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit/policy.wit", world: "rate-limiter" });

/// Length of a usage window, in milliseconds.
const MINUTE_MS: u64 = 60_000;

/// The plugin's settings, from its sidecar JSON.
#[derive(Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// Bucket refill rate, tokens (requests) per second; 0 or less turns the rate limit off.
    rate_per_sec: f64,
    /// Bucket capacity; values below 1 are treated as 1.
    burst: f64,
    /// Generated tokens a client may use per minute; 0 turns the budget off.
    tokens_per_minute: u64,
    /// How many clients to track before evicting.
    max_clients: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rate_per_sec: 5.0,
            burst: 10.0,
            tokens_per_minute: 0,
            max_clients: 10_000,
        }
    }
}

impl Config {
    /// Parses the config JSON (empty text means the defaults) and clamps odd values.
    fn parse(text: &str) -> Result<Config, serde_json::Error> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let mut config: Config = serde_json::from_str(text)?;
        config.burst = config.burst.max(1.0);
        config.max_clients = config.max_clients.max(1);
        Ok(config)
    }

    /// Reads the config from the host, falling back to the defaults (with an error logged)
    /// when it is not valid.
    fn load() -> Config {
        Config::parse(&host::config()).unwrap_or_else(|err| {
            host::log(
                LogLevel::Error,
                &format!("bad config ({err}); using the defaults"),
            );
            Config::default()
        })
    }
}

/// What the limiter remembers about one client.
struct Client {
    /// Tokens in the bucket as of `refilled_ms`.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    refilled_ms: u64,
    /// The usage window `used` counts in (`now-ms / 60000`).
    window: u64,
    /// Generated tokens charged in `window`.
    used: u64,
    /// When the client was last seen, for evicting the least recently seen.
    seen_ms: u64,
}

impl Client {
    /// A client seen for the first time: full bucket, nothing used.
    fn new(config: &Config, now: u64) -> Client {
        Client {
            tokens: config.burst,
            refilled_ms: now,
            window: now / MINUTE_MS,
            used: 0,
            seen_ms: now,
        }
    }

    /// Adds the tokens earned since the last refill, up to the bucket size.
    fn refill(&mut self, config: &Config, now: u64) {
        let elapsed = now.saturating_sub(self.refilled_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * config.rate_per_sec).min(config.burst);
        self.refilled_ms = now;
    }

    /// Generated tokens charged in the current window.
    fn used_now(&self, now: u64) -> u64 {
        if self.window == now / MINUTE_MS {
            self.used
        } else {
            0
        }
    }

    /// Whether forgetting this client would change nothing: its bucket has refilled and its
    /// usage window has rolled over.
    fn is_idle(&self, config: &Config, now: u64) -> bool {
        let elapsed = now.saturating_sub(self.refilled_ms) as f64 / 1000.0;
        let full = config.rate_per_sec <= 0.0
            || self.tokens + elapsed * config.rate_per_sec >= config.burst;
        full && self.used_now(now) == 0
    }
}

/// The limiter's state: its config and every tracked client.
struct Limiter {
    config: Config,
    clients: BTreeMap<String, Client>,
}

impl Limiter {
    /// A limiter with no clients yet.
    fn new(config: Config) -> Limiter {
        Limiter {
            config,
            clients: BTreeMap::new(),
        }
    }

    /// The state for `id`, created (after making room if needed) when new.
    fn client(&mut self, id: &str, now: u64) -> &mut Client {
        if !self.clients.contains_key(id) {
            if self.clients.len() >= self.config.max_clients {
                self.evict(now);
            }
            self.clients
                .insert(id.to_owned(), Client::new(&self.config, now));
        }
        let client = self.clients.get_mut(id).expect("just inserted");
        client.seen_ms = now;
        client
    }

    /// Makes room for one client: drops every idle client, or else the least recently seen.
    fn evict(&mut self, now: u64) {
        let config = &self.config;
        self.clients.retain(|_, c| !c.is_idle(config, now));
        if self.clients.len() >= config.max_clients {
            let oldest = self
                .clients
                .iter()
                .min_by_key(|(_, c)| c.seen_ms)
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                self.clients.remove(&id);
            }
        }
    }

    /// Decides one request from `client_id` at time `now`.
    fn check(&mut self, client_id: &str, now: u64) -> Decision {
        let config = self.config;
        if config.rate_per_sec <= 0.0 && config.tokens_per_minute == 0 {
            return Decision::Allow;
        }
        let client = self.client(client_id, now);

        let budget = config.tokens_per_minute;
        if budget > 0 && client.used_now(now) >= budget {
            let window_end = (now / MINUTE_MS + 1) * MINUTE_MS;
            return Decision::Reject(Rejection {
                retry_after_ms: window_end - now,
                reason: format!("client {client_id} over {budget} generated tokens/min"),
            });
        }
        let rate = config.rate_per_sec;
        if rate > 0.0 {
            client.refill(&config, now);
            if client.tokens < 1.0 {
                let wait_ms = ((1.0 - client.tokens) / rate * 1000.0).ceil() as u64;
                return Decision::Reject(Rejection {
                    retry_after_ms: wait_ms.max(1),
                    reason: format!("client {client_id} over {rate} req/s"),
                });
            }
            client.tokens -= 1.0;
        }
        Decision::Allow
    }

    /// Charges a finished request's generated tokens to its client's current window.
    fn record(&mut self, usage: &Usage, now: u64) {
        if self.config.tokens_per_minute == 0 {
            return;
        }
        let client = self.client(&usage.client_id, now);
        let window = now / MINUTE_MS;
        if client.window != window {
            client.window = window;
            client.used = 0;
        }
        client.used = client
            .used
            .saturating_add(u64::from(usage.generated_tokens));
    }
}

/// The limiter, created on the first call. Calls into one instance never overlap, so the lock
/// is never contended; it only makes the static safe to share.
static LIMITER: Mutex<Option<Limiter>> = Mutex::new(None);

/// Runs `f` on the limiter, creating it (and reading the config) first if needed.
fn with_limiter<T>(f: impl FnOnce(&mut Limiter) -> T) -> T {
    let mut guard = LIMITER.lock().unwrap_or_else(|e| e.into_inner());
    let limiter = guard.get_or_insert_with(|| Limiter::new(Config::load()));
    f(limiter)
}

/// The exported `rate-limit` interface.
struct TokenBucket;

impl Guest for TokenBucket {
    fn check(request: RequestInfo) -> Decision {
        with_limiter(|l| l.check(&request.client_id, host::now_ms()))
    }

    fn record_usage(usage: Usage) {
        with_limiter(|l| l.record(&usage, host::now_ms()));
    }
}

export!(TokenBucket);

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(limiter: &mut Limiter, client: &str, now: u64) -> Option<(u64, String)> {
        match limiter.check(client, now) {
            Decision::Allow => None,
            Decision::Reject(r) => Some((r.retry_after_ms, r.reason)),
        }
    }

    fn usage(client: &str, generated_tokens: u32) -> Usage {
        Usage {
            request_id: "r".into(),
            client_id: client.into(),
            prompt_tokens: 1,
            generated_tokens,
        }
    }

    #[test]
    fn burst_then_rate() {
        let config = Config::parse(r#"{"rate_per_sec": 5, "burst": 2}"#).unwrap();
        let mut l = Limiter::new(config);
        assert_eq!(verdict(&mut l, "alice", 1000), None);
        assert_eq!(verdict(&mut l, "alice", 1000), None);
        let (retry, reason) = verdict(&mut l, "alice", 1000).unwrap();
        assert_eq!((retry, reason.as_str()), (200, "client alice over 5 req/s"));
        // Other clients have their own bucket.
        assert_eq!(verdict(&mut l, "bob", 1000), None);
        // Half a token after 100 ms: 100 ms more to wait.
        assert_eq!(verdict(&mut l, "alice", 1100).unwrap().0, 100);
        assert_eq!(verdict(&mut l, "alice", 1200), None);
    }

    #[test]
    fn token_budget_until_window_rolls() {
        let config = Config::parse(r#"{"rate_per_sec": 0, "tokens_per_minute": 100}"#).unwrap();
        let mut l = Limiter::new(config);
        assert_eq!(verdict(&mut l, "alice", 60_000), None);
        l.record(&usage("alice", 60), 61_000);
        assert_eq!(verdict(&mut l, "alice", 62_000), None);
        l.record(&usage("alice", 60), 63_000);
        let (retry, reason) = verdict(&mut l, "alice", 90_000).unwrap();
        assert_eq!(retry, 30_000);
        assert_eq!(reason, "client alice over 100 generated tokens/min");
        assert_eq!(verdict(&mut l, "bob", 90_000), None);
        assert_eq!(verdict(&mut l, "alice", 120_000), None);
    }

    #[test]
    fn evicts_idle_then_oldest() {
        let config = Config::parse(r#"{"rate_per_sec": 1, "burst": 1, "max_clients": 2}"#).unwrap();
        let mut l = Limiter::new(config);
        verdict(&mut l, "a", 0);
        verdict(&mut l, "b", 10);
        verdict(&mut l, "c", 20);
        assert_eq!(l.clients.len(), 2);
        assert!(!l.clients.contains_key("a"));
        // Much later everyone is idle: all are dropped to make room.
        verdict(&mut l, "d", 10_000);
        assert_eq!(l.clients.keys().collect::<Vec<_>>(), ["d"]);
    }

    #[test]
    fn bad_config_is_an_error() {
        assert!(Config::parse(r#"{"rate": 5}"#).is_err());
        assert!(Config::parse("not json").is_err());
        assert_eq!(Config::parse("").unwrap().rate_per_sec, 5.0);
    }
}
