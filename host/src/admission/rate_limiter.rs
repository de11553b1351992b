//! Built-in token-bucket rate limiter: one bucket per client, plus an optional global bucket.
//!
//! Buckets refill continuously (fractional tokens) at `max_requests` per `time_window_ms` and
//! hold at most `burst` tokens. A request takes one token from its client's bucket and one from
//! the global bucket; if either is empty, nothing is taken and the caller learns how long to
//! wait. Full client buckets carry no information (a new client starts full), so they are
//! pruned from time to time to keep memory bounded.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::RateLimiterConfig;

/// Prune full client buckets at least once every this many checks.
const PRUNE_INTERVAL: u64 = 1024;
/// Also prune whenever the number of tracked clients passes this (doubled after each prune
/// that leaves many clients, so pruning stays amortized O(1) per check).
const MIN_PRUNE_THRESHOLD: usize = 1024;
/// Tolerance for float rounding when testing whether a token is available.
const EPSILON: f64 = 1e-9;

/// Which bucket refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    /// The client's own bucket.
    Client,
    /// The bucket shared by all clients.
    Global,
}

impl LimitScope {
    /// `"client"` or `"global"` (for logs, metrics labels and JSON bodies).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitScope::Client => "client",
            LimitScope::Global => "global",
        }
    }
}

/// A refused request: which limit it hit and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded ({}); retry after {} ms", .scope.as_str(), .retry_after.as_millis())]
pub struct RateLimited {
    /// Time until a token is available (at least 1 ms, whole milliseconds).
    pub retry_after: Duration,
    /// Which bucket is empty.
    pub scope: LimitScope,
}

impl RateLimited {
    /// `retry_after` in whole seconds, rounded up (for the `Retry-After` header; at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        let ms = self.retry_after.as_millis();
        let secs = ms.div_ceil(1000).max(1);
        u64::try_from(secs).unwrap_or(u64::MAX)
    }
}

/// Shape of a bucket: how many tokens it holds and how fast it refills.
#[derive(Debug, Clone, Copy)]
struct BucketSpec {
    capacity: f64,
    /// Tokens per second.
    rate: f64,
}

impl BucketSpec {
    /// A bucket refilled with `per_window` tokens every `window_ms`; zeros are raised to 1 so
    /// an unvalidated config cannot divide by zero.
    fn new(capacity: u32, per_window: u32, window_ms: u64) -> Self {
        let window_secs = window_ms.max(1) as f64 / 1000.0;
        Self {
            capacity: f64::from(capacity.max(1)),
            rate: f64::from(per_window.max(1)) / window_secs,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(spec: BucketSpec, now: Instant) -> Self {
        Self {
            tokens: spec.capacity,
            updated: now,
        }
    }

    /// Adds the tokens earned since the last update (time never runs backwards here).
    fn refill(&mut self, spec: BucketSpec, now: Instant) {
        if now > self.updated {
            let earned = now.duration_since(self.updated).as_secs_f64() * spec.rate;
            self.tokens = (self.tokens + earned).min(spec.capacity);
            self.updated = now;
        }
    }

    fn has_token(&self) -> bool {
        self.tokens >= 1.0 - EPSILON
    }

    fn take(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// Time until one token is available, rounded up to whole milliseconds, at least 1 ms.
    fn wait_for_token(&self, spec: BucketSpec) -> Duration {
        let secs = (1.0 - self.tokens).max(0.0) / spec.rate;
        let ms = (secs * 1000.0).ceil().max(1.0);
        // `as` saturates for huge or non-finite values, so this cannot overflow.
        Duration::from_millis(ms as u64)
    }

    /// Whether the bucket would be full at `now` (so forgetting it changes nothing).
    fn is_full_at(&self, spec: BucketSpec, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(spec, now);
        copy.tokens >= spec.capacity - EPSILON
    }
}

#[derive(Debug)]
struct State {
    clients: HashMap<String, Bucket>,
    global: Option<Bucket>,
    checks_since_prune: u64,
    prune_threshold: usize,
}

/// Token-bucket rate limiter, shared by reference between request handlers.
#[derive(Debug)]
pub struct RateLimiter {
    enabled: bool,
    client: BucketSpec,
    global: Option<BucketSpec>,
    state: Mutex<State>,
}

impl RateLimiter {
    /// Builds a limiter from its config section (all buckets start full).
    pub fn new(cfg: &RateLimiterConfig) -> RateLimiter {
        let window = cfg.time_window_ms;
        let client = BucketSpec::new(cfg.client_capacity(), cfg.max_requests, window);
        let global = cfg
            .global_max_requests
            .map(|max| BucketSpec::new(cfg.global_capacity().unwrap_or(max), max, window));
        RateLimiter {
            enabled: cfg.enabled,
            client,
            global,
            state: Mutex::new(State {
                clients: HashMap::new(),
                global: None,
                checks_since_prune: 0,
                prune_threshold: MIN_PRUNE_THRESHOLD,
            }),
        }
    }

    /// Whether the limiter refuses anything at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Admits one request from `client_id` at `now`, taking a token from its bucket and from
    /// the global bucket; refuses it (taking nothing) if either is empty.
    pub fn check(&self, client_id: &str, now: Instant) -> Result<(), RateLimited> {
        if !self.enabled {
            return Ok(());
        }
        let mut state = self.lock();
        let result = self.check_locked(&mut state, client_id, now);
        state.checks_since_prune += 1;
        if state.checks_since_prune >= PRUNE_INTERVAL || state.clients.len() > state.prune_threshold
        {
            self.prune_locked(&mut state, now);
        }
        result
    }

    /// Forgets every client whose bucket is full at `now` (the same as a new client's).
    pub fn prune_idle(&self, now: Instant) {
        let mut state = self.lock();
        self.prune_locked(&mut state, now);
    }

    /// Number of clients with a bucket in memory.
    pub fn tracked_clients(&self) -> usize {
        self.lock().clients.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_locked(
        &self,
        state: &mut State,
        client_id: &str,
        now: Instant,
    ) -> Result<(), RateLimited> {
        let client_spec = self.client;
        let mut client = state
            .clients
            .get(client_id)
            .copied()
            .unwrap_or_else(|| Bucket::full(client_spec, now));
        client.refill(client_spec, now);
        let mut global = self.global.map(|spec| {
            let mut bucket = state.global.unwrap_or_else(|| Bucket::full(spec, now));
            bucket.refill(spec, now);
            (bucket, spec)
        });

        let refusal = self.refusal(&client, global.as_ref());
        if refusal.is_none() {
            client.take();
            if let Some((bucket, _)) = global.as_mut() {
                bucket.take();
            }
        }
        if !client.is_full_at(client_spec, now) {
            state.clients.insert(client_id.to_string(), client);
        }
        state.global = global.map(|(bucket, _)| bucket);
        refusal.map_or(Ok(()), Err)
    }

    /// The longer wait among the empty buckets, if any is empty.
    fn refusal(
        &self,
        client: &Bucket,
        global: Option<&(Bucket, BucketSpec)>,
    ) -> Option<RateLimited> {
        let client_wait = (!client.has_token()).then(|| client.wait_for_token(self.client));
        let global_wait = global
            .filter(|(bucket, _)| !bucket.has_token())
            .map(|(bucket, spec)| bucket.wait_for_token(*spec));
        match (client_wait, global_wait) {
            (None, None) => None,
            (Some(c), Some(g)) if g > c => Some(limited(g, LimitScope::Global)),
            (Some(c), _) => Some(limited(c, LimitScope::Client)),
            (None, Some(g)) => Some(limited(g, LimitScope::Global)),
        }
    }

    fn prune_locked(&self, state: &mut State, now: Instant) {
        let spec = self.client;
        state
            .clients
            .retain(|_, bucket| !bucket.is_full_at(spec, now));
        state.checks_since_prune = 0;
        state.prune_threshold = (state.clients.len() * 2).max(MIN_PRUNE_THRESHOLD);
    }
}

fn limited(retry_after: Duration, scope: LimitScope) -> RateLimited {
    RateLimited { retry_after, scope }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_requests: u32, window_ms: u64, burst: Option<u32>) -> RateLimiterConfig {
        RateLimiterConfig {
            enabled: true,
            max_requests,
            time_window_ms: window_ms,
            burst,
            global_max_requests: None,
            global_burst: None,
            max_concurrent_per_client: 0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn allows_up_to_burst_then_refuses() {
        let limiter = RateLimiter::new(&config(5, 1000, None));
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(limiter.check("a", t0).is_ok(), "request {i}");
        }
        let err = limiter.check("a", t0).err();
        assert_eq!(
            err,
            Some(RateLimited {
                retry_after: ms(200),
                scope: LimitScope::Client
            })
        );
    }

    #[test]
    fn burst_sets_capacity_separately_from_rate() {
        let limiter = RateLimiter::new(&config(1, 1000, Some(3)));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("a", t0).is_ok());
        }
        let err = limiter.check("a", t0).err().map(|e| e.retry_after);
        assert_eq!(err, Some(ms(1000)));
    }

    #[test]
    fn refills_continuously() {
        let limiter = RateLimiter::new(&config(10, 1000, None));
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(limiter.check("a", t0).is_ok());
        }
        assert!(limiter.check("a", t0 + ms(50)).is_err());
        // 100 ms earns one token.
        assert!(limiter.check("a", t0 + ms(100)).is_ok());
        assert!(limiter.check("a", t0 + ms(100)).is_err());
        // Half a token after 50 more ms: still refused, with the remaining half-token wait.
        let wait = limiter
            .check("a", t0 + ms(150))
            .err()
            .map(|e| e.retry_after);
        assert_eq!(wait, Some(ms(50)));
        assert!(limiter.check("a", t0 + ms(200)).is_ok());
    }

    #[test]
    fn refill_never_exceeds_capacity() {
        let limiter = RateLimiter::new(&config(2, 1000, None));
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        let later = t0 + Duration::from_secs(3600);
        assert!(limiter.check("a", later).is_ok());
        assert!(limiter.check("a", later).is_ok());
        assert!(limiter.check("a", later).is_err());
    }

    #[test]
    fn clients_are_independent() {
        let limiter = RateLimiter::new(&config(1, 1000, None));
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        assert!(limiter.check("a", t0).is_err());
        assert!(limiter.check("b", t0).is_ok());
    }

    #[test]
    fn refusal_consumes_nothing() {
        let limiter = RateLimiter::new(&config(1, 1000, None));
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        for _ in 0..100 {
            assert!(limiter.check("a", t0 + ms(10)).is_err());
        }
        assert!(limiter.check("a", t0 + ms(1000)).is_ok());
    }

    #[test]
    fn retry_after_is_at_least_one_ms_and_rounds_up() {
        let limiter = RateLimiter::new(&config(3, 1000, None));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("a", t0).is_ok());
        }
        // One token takes 333.33 ms: rounded up to 334.
        let wait = limiter.check("a", t0).err().map(|e| e.retry_after);
        assert_eq!(wait, Some(ms(334)));
        let wait = limiter
            .check("a", t0 + Duration::from_micros(333_200))
            .err()
            .map(|e| e.retry_after);
        assert_eq!(wait, Some(ms(1)));
        assert!(limiter.check("a", t0 + ms(334)).is_ok());
    }

    #[test]
    fn retry_after_secs_rounds_up() {
        let r = |n| RateLimited {
            retry_after: ms(n),
            scope: LimitScope::Client,
        };
        assert_eq!(r(1).retry_after_secs(), 1);
        assert_eq!(r(1000).retry_after_secs(), 1);
        assert_eq!(r(1001).retry_after_secs(), 2);
        assert_eq!(r(0).retry_after_secs(), 1);
    }

    #[test]
    fn global_bucket_limits_all_clients() {
        let mut cfg = config(10, 1000, None);
        cfg.global_max_requests = Some(3);
        let limiter = RateLimiter::new(&cfg);
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        assert!(limiter.check("b", t0).is_ok());
        assert!(limiter.check("c", t0).is_ok());
        let err = limiter.check("d", t0).err();
        assert_eq!(err.map(|e| e.scope), Some(LimitScope::Global));
        assert_eq!(err.map(|e| e.retry_after), Some(ms(334)));
    }

    #[test]
    fn global_refusal_does_not_consume_client_token() {
        let mut cfg = config(1, 1000, None);
        cfg.global_max_requests = Some(1);
        cfg.global_burst = Some(1);
        let limiter = RateLimiter::new(&cfg);
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        // Global empty: b is refused, and b's own token must still be there afterwards.
        assert_eq!(
            limiter.check("b", t0).err().map(|e| e.scope),
            Some(LimitScope::Global)
        );
        assert!(limiter.check("b", t0 + ms(1000)).is_ok());
    }

    #[test]
    fn client_refusal_does_not_consume_global_token() {
        let mut cfg = config(1, 1000, None);
        cfg.global_max_requests = Some(2);
        let limiter = RateLimiter::new(&cfg);
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        for _ in 0..5 {
            assert_eq!(
                limiter.check("a", t0).err().map(|e| e.scope),
                Some(LimitScope::Client)
            );
        }
        assert!(limiter.check("b", t0).is_ok());
    }

    #[test]
    fn longer_wait_wins_when_both_are_empty() {
        let mut cfg = config(1, 1000, None);
        cfg.global_max_requests = Some(1);
        cfg.global_burst = Some(1);
        cfg.time_window_ms = 1000;
        let limiter = RateLimiter::new(&cfg);
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        // Both buckets empty, same rate: equal waits report the client scope.
        let err = limiter.check("a", t0 + ms(400)).err();
        assert_eq!(err.map(|e| e.scope), Some(LimitScope::Client));
        assert_eq!(err.map(|e| e.retry_after), Some(ms(600)));
    }

    #[test]
    fn global_burst_sets_global_capacity() {
        let mut cfg = config(100, 1000, None);
        cfg.global_max_requests = Some(1);
        cfg.global_burst = Some(4);
        let limiter = RateLimiter::new(&cfg);
        let t0 = Instant::now();
        for c in ["a", "b", "c", "d"] {
            assert!(limiter.check(c, t0).is_ok());
        }
        assert!(limiter.check("e", t0).is_err());
    }

    #[test]
    fn disabled_always_admits_and_tracks_nothing() {
        let mut cfg = config(1, 1000, None);
        cfg.enabled = false;
        let limiter = RateLimiter::new(&cfg);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(limiter.check("a", t0).is_ok());
        }
        assert!(!limiter.enabled());
        assert_eq!(limiter.tracked_clients(), 0);
    }

    #[test]
    fn zero_values_do_not_panic() {
        let limiter = RateLimiter::new(&config(0, 0, Some(0)));
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        let err = limiter.check("a", t0).err();
        assert!(err.is_some_and(|e| e.retry_after >= ms(1)));
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let limiter = RateLimiter::new(&config(1, 1000, None));
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(limiter.check("a", t0).is_ok());
        assert!(limiter.check("a", t0 - Duration::from_secs(5)).is_err());
        assert!(limiter.check("a", t0 + ms(1000)).is_ok());
    }

    #[test]
    fn full_buckets_are_pruned_periodically() {
        let limiter = RateLimiter::new(&config(1, 1000, None));
        let t0 = Instant::now();
        for i in 0..1000 {
            assert!(limiter.check(&format!("client-{i}"), t0).is_ok());
        }
        assert_eq!(limiter.tracked_clients(), 1000);
        // A second later every bucket is full again; the 1024th check prunes them.
        let t1 = t0 + ms(1000);
        for _ in 0..(PRUNE_INTERVAL as usize - 1000) {
            let _ = limiter.check("busy", t1);
        }
        assert_eq!(limiter.tracked_clients(), 1, "only `busy` is not full");
    }

    #[test]
    fn memory_stays_bounded_with_many_distinct_clients() {
        let limiter = RateLimiter::new(&config(1, 1000, None));
        let t0 = Instant::now();
        // One new client per millisecond: each bucket is full again 1000 ms after its check.
        let mut most = 0;
        for i in 0..10_000u64 {
            assert!(limiter.check(&format!("c{i}"), t0 + ms(i)).is_ok());
            most = most.max(limiter.tracked_clients());
        }
        // At most ~1000 refilling buckets plus one prune interval of new ones.
        assert!(most <= 1000 + PRUNE_INTERVAL as usize + 1, "{most}");
        assert!(
            limiter.tracked_clients() >= 999,
            "recent clients must be kept"
        );
    }

    #[test]
    fn prune_idle_keeps_clients_still_refilling() {
        let limiter = RateLimiter::new(&config(1, 1000, None));
        let t0 = Instant::now();
        assert!(limiter.check("old", t0).is_ok());
        assert!(limiter.check("new", t0 + ms(900)).is_ok());
        limiter.prune_idle(t0 + ms(1000));
        assert_eq!(limiter.tracked_clients(), 1);
        // `new` kept its state: still empty.
        assert!(limiter.check("new", t0 + ms(1000)).is_err());
        // `old` was forgotten and starts full.
        assert!(limiter.check("old", t0 + ms(1000)).is_ok());
    }

    #[test]
    fn full_client_is_not_stored() {
        // Burst 2: after one request the bucket is not full and must be stored.
        let limiter = RateLimiter::new(&config(2, 1000, None));
        let t0 = Instant::now();
        assert!(limiter.check("a", t0).is_ok());
        assert_eq!(limiter.tracked_clients(), 1);
        limiter.prune_idle(t0 + ms(500));
        assert_eq!(limiter.tracked_clients(), 0);
    }

    #[test]
    fn shared_between_threads() {
        let limiter = std::sync::Arc::new(RateLimiter::new(&config(100, 1000, None)));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let limiter = limiter.clone();
                std::thread::spawn(move || {
                    (0..50).filter(|_| limiter.check("a", t0).is_ok()).count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn display_names_scope_and_wait() {
        let e = RateLimited {
            retry_after: ms(250),
            scope: LimitScope::Global,
        };
        assert_eq!(
            e.to_string(),
            "rate limit exceeded (global); retry after 250 ms"
        );
    }
}
