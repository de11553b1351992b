//! Request lifecycle tracking: what happened to each recent request, and when.
//!
//! Every stage a request passes (received, queued, scheduled, first token, finished, ...) is
//! recorded with a monotonic timestamp. Only the last `capacity` request ids are remembered,
//! so memory stays bounded; `GET /requests/{id}` reads a [`RequestRecord`].

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Most events kept per request; beyond this the oldest after the first are dropped.
const MAX_EVENTS: usize = 64;
/// Longest detail text kept, in bytes.
const MAX_DETAIL_BYTES: usize = 512;
/// Longest accepted client-supplied request id.
const MAX_CLIENT_ID_LEN: usize = 128;

/// A step in a request's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Arrived: recorded by the HTTP layer when a generation request comes in, before its body
    /// is parsed or validated.
    Received,
    /// Refused by a rate limit.
    RateLimited,
    /// Waiting in the request queue.
    Queued,
    /// Taken by the scheduler into the running batch.
    Scheduled,
    /// Its first generated token was sent.
    FirstToken,
    /// Evicted from the batch to free KV cache; it will be re-queued.
    Preempted,
    /// Completed normally.
    Finished,
    /// Stopped because the client went away or asked.
    Cancelled,
    /// Stopped by an error.
    Failed,
}

impl Stage {
    /// The stage's snake_case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Received => "received",
            Stage::RateLimited => "rate_limited",
            Stage::Queued => "queued",
            Stage::Scheduled => "scheduled",
            Stage::FirstToken => "first_token",
            Stage::Preempted => "preempted",
            Stage::Finished => "finished",
            Stage::Cancelled => "cancelled",
            Stage::Failed => "failed",
        }
    }

    /// Whether the request's life is over at this stage.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Stage::RateLimited | Stage::Finished | Stage::Cancelled | Stage::Failed
        )
    }
}

/// One recorded stage, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// The stage reached.
    pub stage: Stage,
    /// Milliseconds since the request's first event.
    pub at_ms: f64,
    /// Extra information (e.g. an error message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What is known about one request, as served by `GET /requests/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    /// The request id.
    pub id: String,
    /// Its events, oldest first.
    pub events: Vec<EventRecord>,
    /// The latest stage; `failed` once any of its sequences failed, since the cancellation
    /// of its other sequences that follows must not hide the failure.
    pub state: Stage,
}

struct Event {
    stage: Stage,
    at: Instant,
    detail: Option<String>,
}

struct Inner {
    requests: HashMap<String, Vec<Event>>,
    /// Ids in first-seen order, oldest at the front.
    order: VecDeque<String>,
}

/// Bounded, thread-safe history of recent requests.
pub struct RequestTracker {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for RequestTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTracker")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl RequestTracker {
    /// A tracker remembering the last `capacity` requests; 0 disables it.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner {
                requests: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// Whether anything is recorded (capacity above 0).
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// How many requests are remembered at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many requests are remembered now.
    pub fn len(&self) -> usize {
        self.lock().requests.len()
    }

    /// Whether no request is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that request `id` reached `stage` now; the first record of an id creates it,
    /// evicting the oldest request when full.
    pub fn record(&self, id: &str, stage: Stage) {
        self.push_event(id, stage, None);
    }

    /// Like [`RequestTracker::record`], with a detail (truncated to 512 bytes).
    pub fn record_with(&self, id: &str, stage: Stage, detail: impl Into<String>) {
        self.push_event(
            id,
            stage,
            Some(crate::text::truncate(detail.into(), MAX_DETAIL_BYTES)),
        );
    }

    /// The history of request `id`, if it is still remembered.
    pub fn get(&self, id: &str) -> Option<RequestRecord> {
        let inner = self.lock();
        let events = inner.requests.get(id)?;
        let first = events.first()?.at;
        let failed = events.iter().any(|e| e.stage == Stage::Failed);
        let state = if failed {
            Stage::Failed
        } else {
            events.last()?.stage
        };
        let events = events
            .iter()
            .map(|e| EventRecord {
                stage: e.stage,
                at_ms: e.at.saturating_duration_since(first).as_secs_f64() * 1000.0,
                detail: e.detail.clone(),
            })
            .collect();
        Some(RequestRecord {
            id: id.to_string(),
            events,
            state,
        })
    }

    /// A fresh request id: 32 lowercase hex digits (128 bits) mixing the time, a process-wide
    /// counter and the process id through randomly keyed hashes.
    pub fn generate_id() -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
        let (k1, k2) = KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = (
            count,
            nanos,
            std::process::id(),
            std::thread::current().id(),
        );
        format!("{:016x}{:016x}", k1.hash_one(seed), k2.hash_one(seed))
    }

    /// Whether a client-supplied `X-Request-Id` is acceptable: 1 to 128 visible ASCII
    /// characters, no spaces.
    pub fn is_valid_client_id(s: &str) -> bool {
        (1..=MAX_CLIENT_ID_LEN).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
    }

    fn push_event(&self, id: &str, stage: Stage, detail: Option<String>) {
        if self.capacity == 0 {
            return;
        }
        let event = Event {
            stage,
            at: Instant::now(),
            detail,
        };
        let mut inner = self.lock();
        if let Some(events) = inner.requests.get_mut(id) {
            if events.len() >= MAX_EVENTS {
                // Keep the first event (the time origin) and the most recent ones.
                events.remove(1);
            }
            events.push(event);
            return;
        }
        while inner.order.len() >= self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.requests.remove(&oldest);
        }
        inner.order.push_back(id.to_string());
        inner.requests.insert(id.to_string(), vec![event]);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn stages(record: &RequestRecord) -> Vec<Stage> {
        record.events.iter().map(|e| e.stage).collect()
    }

    #[test]
    fn events_are_kept_in_order() {
        let t = RequestTracker::new(10);
        t.record("r1", Stage::Received);
        t.record("r1", Stage::Queued);
        t.record("r1", Stage::Scheduled);
        t.record("r1", Stage::FirstToken);
        t.record_with("r1", Stage::Finished, "stop");
        let Some(r) = t.get("r1") else {
            panic!("r1 missing")
        };
        assert_eq!(r.id, "r1");
        assert_eq!(
            stages(&r),
            vec![
                Stage::Received,
                Stage::Queued,
                Stage::Scheduled,
                Stage::FirstToken,
                Stage::Finished
            ]
        );
        assert_eq!(r.state, Stage::Finished);
        assert_eq!(r.events[0].at_ms, 0.0);
        assert!(r.events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert_eq!(r.events[4].detail.as_deref(), Some("stop"));
        assert_eq!(r.events[0].detail, None);
    }

    #[test]
    fn timestamps_measure_elapsed_time() {
        let t = RequestTracker::new(10);
        t.record("r", Stage::Received);
        std::thread::sleep(std::time::Duration::from_millis(15));
        t.record("r", Stage::Finished);
        let at = t.get("r").map(|r| r.events[1].at_ms);
        assert!(at.is_some_and(|ms| ms >= 15.0), "{at:?}");
    }

    #[test]
    fn unknown_id_is_none() {
        let t = RequestTracker::new(10);
        t.record("a", Stage::Received);
        assert!(t.get("b").is_none());
        assert!(t.get("").is_none());
    }

    #[test]
    fn oldest_request_is_evicted_at_capacity() {
        let t = RequestTracker::new(3);
        for id in ["a", "b", "c"] {
            t.record(id, Stage::Received);
        }
        // Recording more events for `a` does not refresh its place.
        t.record("a", Stage::Queued);
        t.record("d", Stage::Received);
        assert_eq!(t.len(), 3);
        assert!(t.get("a").is_none());
        for id in ["b", "c", "d"] {
            assert!(t.get(id).is_some(), "{id}");
        }
        t.record("e", Stage::Received);
        assert!(t.get("b").is_none());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn evicted_id_starts_over() {
        let t = RequestTracker::new(1);
        t.record("a", Stage::Received);
        t.record("b", Stage::Received);
        t.record("a", Stage::Finished);
        let r = t.get("a");
        assert_eq!(r.map(|r| stages(&r)), Some(vec![Stage::Finished]));
        assert!(t.get("b").is_none());
    }

    #[test]
    fn zero_capacity_records_nothing() {
        let t = RequestTracker::new(0);
        assert!(!t.enabled());
        t.record("a", Stage::Received);
        t.record_with("a", Stage::Failed, "boom");
        assert!(t.get("a").is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn events_per_request_are_bounded() {
        let t = RequestTracker::new(4);
        t.record("r", Stage::Received);
        for _ in 0..(MAX_EVENTS * 2) {
            t.record("r", Stage::Preempted);
        }
        t.record("r", Stage::Finished);
        let Some(r) = t.get("r") else {
            panic!("r missing")
        };
        assert_eq!(r.events.len(), MAX_EVENTS);
        assert_eq!(r.events[0].stage, Stage::Received);
        assert_eq!(r.state, Stage::Finished);
    }

    #[test]
    fn long_details_are_truncated_on_a_char_boundary() {
        let t = RequestTracker::new(4);
        t.record_with("r", Stage::Failed, "é".repeat(MAX_DETAIL_BYTES));
        let detail = t.get("r").and_then(|r| r.events[0].detail.clone());
        let Some(detail) = detail else {
            panic!("detail missing")
        };
        assert!(detail.len() <= MAX_DETAIL_BYTES);
        assert_eq!(detail.len(), MAX_DETAIL_BYTES);
        assert!(detail.chars().all(|c| c == 'é'));
    }

    #[test]
    fn record_serializes_as_documented() {
        let t = RequestTracker::new(4);
        t.record("req-1", Stage::Received);
        t.record_with("req-1", Stage::RateLimited, "client");
        let Some(r) = t.get("req-1") else {
            panic!("missing")
        };
        let json = match serde_json::to_value(&r) {
            Ok(v) => v,
            Err(e) => panic!("serialize: {e}"),
        };
        assert_eq!(json["id"], "req-1");
        assert_eq!(json["state"], "rate_limited");
        assert_eq!(json["events"][0]["stage"], "received");
        assert_eq!(json["events"][0]["at_ms"], 0.0);
        assert!(json["events"][0].get("detail").is_none());
        assert_eq!(json["events"][1]["detail"], "client");
    }

    #[test]
    fn a_failure_outlasts_the_cancellations_after_it() {
        let t = RequestTracker::new(4);
        t.record("req-1", Stage::Received);
        t.record_with("req-1", Stage::Failed, "forward pass failed");
        t.record_with("req-1", Stage::Cancelled, "client disconnected");
        assert_eq!(t.get("req-1").map(|r| r.state), Some(Stage::Failed));
        t.record("req-2", Stage::Received);
        t.record("req-2", Stage::Cancelled);
        assert_eq!(t.get("req-2").map(|r| r.state), Some(Stage::Cancelled));
    }

    #[test]
    fn stage_names_match_serde() {
        let all = [
            Stage::Received,
            Stage::RateLimited,
            Stage::Queued,
            Stage::Scheduled,
            Stage::FirstToken,
            Stage::Preempted,
            Stage::Finished,
            Stage::Cancelled,
            Stage::Failed,
        ];
        for stage in all {
            let json = serde_json::to_value(stage).ok();
            assert_eq!(json, Some(serde_json::Value::from(stage.as_str())));
        }
        assert!(Stage::Finished.is_terminal());
        assert!(!Stage::Queued.is_terminal());
    }

    #[test]
    fn generated_ids_are_unique_hex() {
        let ids: Vec<String> = (0..10_000).map(|_| RequestTracker::generate_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(RequestTracker::is_valid_client_id(id));
        }
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn generated_ids_differ_across_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..500)
                        .map(|_| RequestTracker::generate_id())
                        .collect::<Vec<String>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            let ids = h.join().unwrap_or_default();
            assert_eq!(ids.len(), 500);
            all.extend(ids);
        }
        assert_eq!(all.len(), 2000);
    }

    #[test]
    fn client_id_validation() {
        assert!(RequestTracker::is_valid_client_id("abc-123_X.y:z"));
        assert!(RequestTracker::is_valid_client_id(&"a".repeat(128)));
        assert!(!RequestTracker::is_valid_client_id(&"a".repeat(129)));
        assert!(!RequestTracker::is_valid_client_id(""));
        assert!(!RequestTracker::is_valid_client_id("has space"));
        assert!(!RequestTracker::is_valid_client_id("tab\there"));
        assert!(!RequestTracker::is_valid_client_id("new\nline"));
        assert!(!RequestTracker::is_valid_client_id("caf\u{e9}"));
    }

    #[test]
    fn concurrent_records_are_all_kept() {
        let t = std::sync::Arc::new(RequestTracker::new(1000));
        let handles: Vec<_> = (0..4)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let id = format!("{n}-{i}");
                        t.record(&id, Stage::Received);
                        t.record(&id, Stage::Finished);
                    }
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().is_ok());
        }
        assert_eq!(t.len(), 200);
        assert_eq!(t.get("3-49").map(|r| r.events.len()), Some(2));
    }
}
