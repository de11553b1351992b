//! The store behind `cllm:policy/counters` (0.2.0): fixed-window counters that plugins use for
//! limits. In this process by default; in Redis when `plugins.shared_state.redis_url` is set,
//! so that every replica pointing at the same Redis shares the counts.
//!
//! Windows are aligned to the Unix epoch: the window of a call at Unix time `t` ms is
//! `t / window_ms`, the same on every replica whose clock is right.
//!
//! Redis key layout: `cllm:counter:{window_ms}:{window_index}:{key}`, an integer (`INCRBY`),
//! expiring one second after its window ends (`PEXPIRE`, set on every increment), so Redis
//! holds only live windows.
//!
//! Redis calls run on the plugin call's thread, which is never an async worker (plugin calls
//! run on the blocking pool). Each has a bounded time (`timeout_ms`, for connecting, writing and
//! reading). When Redis cannot be reached, the call fails fast (no new connection is tried
//! more often than every [`RECONNECT_EVERY`]), the error is counted
//! (`cllm_shared_state_errors_total{reason}`), and `failure_mode` decides what the plugin gets.

use crate::config::{SharedStateConfig, StoreFailureMode};
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest counter key a plugin may use, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// In-process counters kept before windows that ended are swept out.
const SWEEP_AT: usize = 100_000;
/// How often a broken Redis connection is tried again.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// The counter store all plugins of this process share.
pub struct Counters {
    backend: Backend,
    failure_mode: StoreFailureMode,
    calls: metrics::Counter,
    duration: metrics::Histogram,
    metrics: std::sync::Arc<Metrics>,
}

enum Backend {
    Memory(Mutex<HashMap<String, (u64, i64)>>),
    Redis(Box<RedisStore>),
}

struct RedisStore {
    client: redis::Client,
    timeout: Duration,
    conn: Mutex<RedisConn>,
}

struct RedisConn {
    live: Option<redis::Connection>,
    /// When the last connection attempt failed (no new one before [`RECONNECT_EVERY`]).
    failed_at: Option<Instant>,
}

/// Why a store call failed, as `cllm_shared_state_errors_total{reason}` says it.
#[derive(Debug)]
struct StoreError {
    reason: &'static str,
    message: String,
}

impl Counters {
    /// The store `config` describes. A malformed Redis URL is an error (the server does not
    /// start); an unreachable Redis is not (it is tried on first use, and again later).
    pub fn new(
        config: &SharedStateConfig,
        metrics: std::sync::Arc<Metrics>,
    ) -> anyhow::Result<Counters> {
        let (backend, store) = match &config.redis_url {
            None => (Backend::Memory(Mutex::new(HashMap::new())), "memory"),
            Some(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| anyhow::anyhow!("plugins.shared_state.redis_url: {e}"))?;
                let store = RedisStore {
                    client,
                    timeout: Duration::from_millis(config.timeout_ms.max(1)),
                    conn: Mutex::new(RedisConn {
                        live: None,
                        failed_at: None,
                    }),
                };
                (Backend::Redis(Box::new(store)), "redis")
            }
        };
        let labels = [("store", store.to_string())];
        Ok(Counters {
            backend,
            failure_mode: config.failure_mode,
            calls: metrics.counter("cllm_shared_state_calls_total", &labels),
            duration: metrics.histogram("cllm_shared_state_call_duration_seconds", &labels),
            metrics,
        })
    }

    /// `counters.incr`: adds `delta` to `key`'s count in the current window of `window_ms`.
    pub fn incr(&self, key: &str, delta: i64, window_ms: u64) -> Result<i64, String> {
        if key.len() > MAX_KEY_BYTES {
            return Err(format!("counter key longer than {MAX_KEY_BYTES} bytes"));
        }
        if window_ms == 0 {
            return Err("window-ms must be at least 1".into());
        }
        let started = Instant::now();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let window = now_ms / window_ms;
        let result = match &self.backend {
            Backend::Memory(map) => Ok(memory_incr(map, key, delta, window_ms, window)),
            Backend::Redis(store) => {
                let left_ms = window_ms - now_ms % window_ms;
                store.incr(key, delta, window_ms, window, left_ms)
            }
        };
        self.calls.increment(1);
        self.duration.record(started.elapsed().as_secs_f64());
        result.or_else(|e| {
            self.metrics
                .counter(
                    "cllm_shared_state_errors_total",
                    &[("reason", e.reason.to_string())],
                )
                .increment(1);
            match self.failure_mode {
                StoreFailureMode::FailOpen => Ok(delta),
                StoreFailureMode::FailClosed => Err(e.message),
            }
        })
    }
}

fn memory_incr(
    map: &Mutex<HashMap<String, (u64, i64)>>,
    key: &str,
    delta: i64,
    window_ms: u64,
    window: u64,
) -> i64 {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= SWEEP_AT {
        // Windows are numbered per length, so only a stored entry's own length can tell
        // whether it ended: the entry's key carries it.
        let now_ms = window * window_ms;
        map.retain(|k, (w, _)| {
            let len = k
                .split_once('/')
                .and_then(|(l, _)| l.parse::<u64>().ok())
                .unwrap_or(1);
            (*w + 1) * len > now_ms
        });
    }
    let entry = map
        .entry(format!("{window_ms}/{key}"))
        .or_insert((window, 0));
    if entry.0 != window {
        *entry = (window, 0);
    }
    entry.1 = entry.1.saturating_add(delta);
    entry.1
}

impl RedisStore {
    fn incr(
        &self,
        key: &str,
        delta: i64,
        window_ms: u64,
        window: u64,
        left_ms: u64,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn.live.is_none() {
            if conn
                .failed_at
                .is_some_and(|t| t.elapsed() < RECONNECT_EVERY)
            {
                return Err(StoreError {
                    reason: "unavailable",
                    message: "shared state store unavailable (reconnecting)".into(),
                });
            }
            match self.connect() {
                Ok(c) => {
                    conn.live = Some(c);
                    conn.failed_at = None;
                }
                Err(e) => {
                    conn.failed_at = Some(Instant::now());
                    tracing::warn!("shared state: cannot connect to Redis: {e}");
                    return Err(StoreError {
                        reason: "connect",
                        message: format!("shared state store unreachable: {e}"),
                    });
                }
            }
        }
        let Some(live) = conn.live.as_mut() else {
            return Err(StoreError {
                reason: "unavailable",
                message: "shared state store unavailable".into(),
            });
        };
        let redis_key = format!("cllm:counter:{window_ms}:{window}:{key}");
        let ttl_ms = left_ms + 1000;
        // One round trip; no MULTI/EXEC (which doubles the commands): the expiry follows the
        // increment on the same connection, and a key left without one by a lost reply only
        // lingers until the next increment of its window sets it.
        let reply: redis::RedisResult<(i64,)> = redis::pipe()
            .cmd("INCRBY")
            .arg(&redis_key)
            .arg(delta)
            .cmd("PEXPIRE")
            .arg(&redis_key)
            .arg(ttl_ms)
            .ignore()
            .query(live);
        match reply {
            Ok((value,)) => Ok(value),
            Err(e) => {
                // The connection may be half-read or dead: the next call starts a new one
                // (only a failed connect holds new attempts back for a while).
                conn.live = None;
                let reason = if e.is_timeout() {
                    "timeout"
                } else if e.is_io_error() || e.is_connection_dropped() {
                    "io"
                } else {
                    "command"
                };
                tracing::warn!("shared state: Redis call failed ({reason}): {e}");
                Err(StoreError {
                    reason,
                    message: format!("shared state store failed: {e}"),
                })
            }
        }
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_counts_per_window_and_key() {
        let metrics = std::sync::Arc::new(Metrics::new(true));
        let counters = Counters::new(&SharedStateConfig::default(), metrics).expect("in memory");
        assert_eq!(counters.incr("a", 2, 60_000), Ok(2));
        assert_eq!(counters.incr("a", 3, 60_000), Ok(5));
        assert_eq!(counters.incr("b", 1, 60_000), Ok(1));
        // Another window length is another counter.
        assert_eq!(counters.incr("a", 1, 3_600_000), Ok(1));
        assert!(counters.incr("a", 1, 0).is_err());
        assert!(counters
            .incr(&"k".repeat(MAX_KEY_BYTES + 1), 1, 1000)
            .is_err());
        // A 1 ms window starts again almost at once.
        let first = counters.incr("fast", 1, 1);
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(counters.incr("fast", 1, 1), Ok(1), "{first:?}");
    }
}
