//! The request queue: admitted requests waiting for the scheduler.
//!
//! Higher `priority` is served first, and arrival order within a priority. Async handlers push
//! (cheap, never blocking for long); the scheduler thread blocks in
//! [`RequestQueue::wait_for_work`] and takes the head with [`RequestQueue::pop_if`] once it has
//! room for it. (A preempted sequence does not come back here: the scheduler keeps its own list
//! of those, ahead of the queue.)

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How many recent pops [`QueueStats::average_wait`] averages over.
const WAIT_WINDOW: usize = 100;

/// Position in the queue: smaller is served first.
///
/// `rank` is the negated priority and `seq` the arrival number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    rank: i64,
    seq: i64,
}

struct Entry<T> {
    id: u64,
    priority: i32,
    item: T,
    enqueued: Instant,
}

/// A request refused because the queue is full; it carries the request back.
pub struct QueueFull<T> {
    /// The request that was not queued.
    pub item: T,
    /// The queue's capacity.
    pub max_size: usize,
}

impl<T> QueueFull<T> {
    /// Takes the refused request back.
    pub fn into_inner(self) -> T {
        self.item
    }
}

impl<T> fmt::Debug for QueueFull<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueFull")
            .field("max_size", &self.max_size)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for QueueFull<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request queue is full ({} waiting)", self.max_size)
    }
}

impl<T> std::error::Error for QueueFull<T> {}

/// A request taken from the queue.
#[derive(Debug)]
pub struct Popped<T> {
    /// The id it was pushed with.
    pub id: u64,
    /// Its priority (0 for requests re-queued with `push_front`).
    pub priority: i32,
    /// The request.
    pub item: T,
    /// How long it waited since it was (last) pushed.
    pub waited: Duration,
}

/// A snapshot of the queue for metrics and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests waiting now.
    pub size: usize,
    /// Capacity.
    pub max_size: usize,
    /// Mean wait of the last (up to) 100 requests popped; zero before the first.
    pub average_wait: Duration,
}

struct Inner<T> {
    entries: BTreeMap<Slot, Entry<T>>,
    slots: HashMap<u64, Slot>,
    next_seq: i64,
    recent_waits: VecDeque<Duration>,
    recent_wait_sum: Duration,
    notified: bool,
}

impl<T> Inner<T> {
    fn insert(&mut self, slot: Slot, id: u64, priority: i32, item: T) {
        let entry = Entry {
            id,
            priority,
            item,
            enqueued: Instant::now(),
        };
        self.slots.insert(id, slot);
        self.entries.insert(slot, entry);
    }

    fn take(&mut self, slot: Slot) -> Option<Entry<T>> {
        let entry = self.entries.remove(&slot)?;
        // With duplicate ids the index points at the newest entry; leave that one indexed.
        if self.slots.get(&entry.id) == Some(&slot) {
            self.slots.remove(&entry.id);
        }
        Some(entry)
    }

    fn record_wait(&mut self, waited: Duration) {
        if self.recent_waits.len() == WAIT_WINDOW {
            if let Some(old) = self.recent_waits.pop_front() {
                self.recent_wait_sum = self.recent_wait_sum.saturating_sub(old);
            }
        }
        self.recent_waits.push_back(waited);
        self.recent_wait_sum = self.recent_wait_sum.saturating_add(waited);
    }

    fn average_wait(&self) -> Duration {
        match u32::try_from(self.recent_waits.len()) {
            Ok(0) | Err(_) => Duration::ZERO,
            Ok(n) => self.recent_wait_sum / n,
        }
    }
}

/// A bounded priority queue shared between request handlers and the scheduler thread.
///
/// Ids should be unique among waiting requests; with duplicates, `remove` finds the newest.
pub struct RequestQueue<T> {
    max_size: usize,
    inner: Mutex<Inner<T>>,
    work: Condvar,
}

impl<T> fmt::Debug for RequestQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestQueue")
            .field("len", &self.len())
            .field("max_size", &self.max_size)
            .finish()
    }
}

impl<T> RequestQueue<T> {
    /// An empty queue holding at most `max_size` pushed requests.
    pub fn new(max_size: usize) -> Self {
        Self {
            max_size,
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                slots: HashMap::new(),
                next_seq: 0,
                recent_waits: VecDeque::with_capacity(WAIT_WINDOW),
                recent_wait_sum: Duration::ZERO,
                notified: false,
            }),
            work: Condvar::new(),
        }
    }

    /// Queues a request behind those of higher or equal priority; refuses it, handing it
    /// back, when `max_size` requests are already waiting. Wakes the scheduler.
    pub fn push(&self, id: u64, priority: i32, item: T) -> Result<(), QueueFull<T>> {
        self.push_then(id, priority, item, || {})
    }

    /// [`RequestQueue::push`], running `queued` once the item is in and before anyone can
    /// take it out (the queue's lock is still held): what `queued` records happens before
    /// anything the consumer does with the item.
    pub fn push_then(
        &self,
        id: u64,
        priority: i32,
        item: T,
        queued: impl FnOnce(),
    ) -> Result<(), QueueFull<T>> {
        let mut inner = self.lock();
        if inner.entries.len() >= self.max_size {
            return Err(QueueFull {
                item,
                max_size: self.max_size,
            });
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let slot = Slot {
            rank: -i64::from(priority),
            seq,
        };
        inner.insert(slot, id, priority, item);
        queued();
        drop(inner);
        self.work.notify_all();
        Ok(())
    }

    /// Takes out a waiting request (cancelled or timed out); `None` if it is not waiting.
    pub fn remove(&self, id: u64) -> Option<T> {
        let mut inner = self.lock();
        let slot = *inner.slots.get(&id)?;
        inner.take(slot).map(|e| e.item)
    }

    /// Takes the head if there is one and `accept` agrees, e.g. when enough KV cache is free.
    ///
    /// `accept` runs under the queue's lock: it must be quick and must not use the queue.
    pub fn pop_if(&self, accept: impl FnOnce(&T) -> bool) -> Option<Popped<T>> {
        let mut inner = self.lock();
        let (&slot, head) = inner.entries.first_key_value()?;
        if !accept(&head.item) {
            return None;
        }
        let entry = inner.take(slot)?;
        let waited = entry.enqueued.elapsed();
        inner.record_wait(waited);
        Some(Popped {
            id: entry.id,
            priority: entry.priority,
            item: entry.item,
            waited,
        })
    }

    /// Blocks until the queue is non-empty, [`RequestQueue::notify`] is called, or `timeout`
    /// passes; returns whether the queue is non-empty. A `notify` made while nobody waits
    /// wakes the next wait at once.
    pub fn wait_for_work(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut inner = self.lock();
        while inner.entries.is_empty() && !inner.notified {
            let now = Instant::now();
            let left = match deadline {
                Some(deadline) if deadline <= now => break,
                Some(deadline) => deadline - now,
                None => timeout,
            };
            inner = self
                .work
                .wait_timeout(inner, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        inner.notified = false;
        !inner.entries.is_empty()
    }

    /// Wakes a thread blocked in [`RequestQueue::wait_for_work`] (shutdown, cancellation).
    pub fn notify(&self) {
        self.lock().notified = true;
        self.work.notify_all();
    }

    /// Number of waiting requests.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Capacity given to [`RequestQueue::new`].
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Size, capacity and waiting times.
    pub fn stats(&self) -> QueueStats {
        let inner = self.lock();
        QueueStats {
            size: inner.entries.len(),
            max_size: self.max_size,
            average_wait: inner.average_wait(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    fn pop_all<T>(q: &RequestQueue<T>) -> Vec<u64> {
        std::iter::from_fn(|| q.pop_if(|_| true).map(|p| p.id)).collect()
    }

    #[test]
    fn higher_priority_first() {
        let q = RequestQueue::new(10);
        assert!(q.push(1, 0, "low").is_ok());
        assert!(q.push(2, 5, "high").is_ok());
        assert!(q.push(3, -3, "lowest").is_ok());
        assert!(q.push(4, 1, "mid").is_ok());
        assert_eq!(pop_all(&q), vec![2, 4, 1, 3]);
    }

    #[test]
    fn fifo_within_a_priority() {
        let q = RequestQueue::new(10);
        for id in 0..5 {
            assert!(q.push(id, 7, id).is_ok());
        }
        assert!(q.push(99, 8, 99).is_ok());
        assert_eq!(pop_all(&q), vec![99, 0, 1, 2, 3, 4]);
    }

    #[test]
    fn extreme_priorities_order_correctly() {
        let q = RequestQueue::new(10);
        assert!(q.push(1, i32::MIN, ()).is_ok());
        assert!(q.push(2, i32::MAX, ()).is_ok());
        assert!(q.push(3, 0, ()).is_ok());
        assert_eq!(pop_all(&q), vec![2, 3, 1]);
    }

    #[test]
    fn push_then_runs_under_the_lock_and_only_when_queued() {
        let q = RequestQueue::new(1);
        let mut ran = false;
        q.push_then(1, 0, "a", || {
            // The lock is held: the consumer cannot take the item before this returns.
            assert!(q.inner.try_lock().is_err(), "runs under the queue's lock");
            ran = true;
        })
        .expect("room");
        assert!(ran);
        let mut ran_again = false;
        assert!(q.push_then(2, 0, "b", || ran_again = true).is_err());
        assert!(!ran_again, "a refused item is not reported as queued");
        assert!(q.pop_if(|_| true).is_some());
    }

    #[test]
    fn full_queue_returns_the_item() {
        let q = RequestQueue::new(2);
        assert!(q.push(1, 0, "a".to_string()).is_ok());
        assert!(q.push(2, 0, "b".to_string()).is_ok());
        let err = match q.push(3, 100, "c".to_string()) {
            Ok(()) => panic!("queue should be full"),
            Err(e) => e,
        };
        assert_eq!(err.max_size, 2);
        assert_eq!(err.to_string(), "request queue is full (2 waiting)");
        assert_eq!(err.into_inner(), "c");
        assert_eq!(q.len(), 2);
        assert!(q.pop_if(|_| true).is_some());
        assert!(q.push(3, 0, "c".to_string()).is_ok());
    }

    #[test]
    fn zero_capacity_refuses_everything() {
        let q = RequestQueue::new(0);
        assert!(q.push(1, 0, ()).is_err());
        assert!(q.is_empty());
    }

    #[test]
    fn remove_takes_out_a_waiting_request() {
        let q = RequestQueue::new(10);
        for id in 1..=4 {
            assert!(q.push(id, 0, id * 10).is_ok());
        }
        assert_eq!(q.remove(3), Some(30));
        assert_eq!(q.remove(3), None);
        assert_eq!(q.remove(42), None);
        assert_eq!(q.len(), 3);
        assert_eq!(pop_all(&q), vec![1, 2, 4]);
        assert_eq!(q.remove(1), None, "popped requests are gone");
    }

    #[test]
    fn pop_if_refusing_leaves_the_head() {
        let q = RequestQueue::new(4);
        assert!(q.push(1, 0, 500usize).is_ok());
        assert!(q.push(2, 0, 10usize).is_ok());
        let mut seen = None;
        let got = q.pop_if(|&need| {
            seen = Some(need);
            need <= 100
        });
        assert!(got.is_none());
        assert_eq!(seen, Some(500), "accept is asked about the head only");
        assert_eq!(q.len(), 2);
        let got = q.pop_if(|_| true);
        assert_eq!(got.map(|p| (p.id, p.item)), Some((1, 500)));
    }

    #[test]
    fn pop_if_on_empty_queue_does_not_call_accept() {
        let q: RequestQueue<()> = RequestQueue::new(4);
        let mut called = false;
        assert!(q
            .pop_if(|_| {
                called = true;
                true
            })
            .is_none());
        assert!(!called);
    }

    #[test]
    fn popped_reports_priority_and_wait() {
        let q = RequestQueue::new(4);
        assert!(q.push(7, 3, ()).is_ok());
        std::thread::sleep(Duration::from_millis(5));
        let p = q.pop_if(|_| true);
        assert_eq!(p.as_ref().map(|p| (p.id, p.priority)), Some((7, 3)));
        assert!(p.is_some_and(|p| p.waited >= Duration::from_millis(5)));
    }

    #[test]
    fn stats_track_size_and_waits() {
        let q = RequestQueue::new(8);
        let empty = q.stats();
        assert_eq!(
            empty,
            QueueStats {
                size: 0,
                max_size: 8,
                average_wait: Duration::ZERO,
            }
        );
        assert!(q.push(1, 0, ()).is_ok());
        std::thread::sleep(Duration::from_millis(10));
        assert!(q.push(2, 9, ()).is_ok());
        let s = q.stats();
        assert_eq!(s.size, 2);
        assert!(q.pop_if(|_| true).is_some());
        assert!(q.pop_if(|_| true).is_some());
        let s = q.stats();
        assert_eq!(s.size, 0);
        // The two waits were >= 10 ms and >= 0 ms: the mean is at least 5 ms.
        assert!(s.average_wait >= Duration::from_millis(5), "{s:?}");
    }

    #[test]
    fn average_wait_covers_recent_pops_only() {
        let q = RequestQueue::new(8);
        assert!(q.push(0, 0, ()).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        assert!(q.pop_if(|_| true).is_some());
        assert!(q.stats().average_wait >= Duration::from_millis(30));
        for id in 1..=WAIT_WINDOW as u64 {
            assert!(q.push(id, 0, ()).is_ok());
            assert!(q.pop_if(|_| true).is_some());
        }
        // The slow pop has left the window; quick pops average well under 30 ms.
        assert!(q.stats().average_wait < Duration::from_millis(30));
    }

    #[test]
    fn duplicate_ids_stay_consistent() {
        let q = RequestQueue::new(8);
        assert!(q.push(1, 0, "first").is_ok());
        assert!(q.push(1, 0, "second").is_ok());
        assert_eq!(q.remove(1), Some("second"));
        assert_eq!(q.pop_if(|_| true).map(|p| p.item), Some("first"));
        assert!(q.is_empty());
    }

    #[test]
    fn wait_for_work_returns_at_once_when_non_empty() {
        let q = RequestQueue::new(4);
        assert!(q.push(1, 0, ()).is_ok());
        let start = Instant::now();
        assert!(q.wait_for_work(Duration::from_secs(30)));
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn wait_for_work_times_out_when_empty() {
        let q: RequestQueue<()> = RequestQueue::new(4);
        let start = Instant::now();
        assert!(!q.wait_for_work(Duration::from_millis(30)));
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn wait_for_work_wakes_on_push_from_another_thread() {
        let q = Arc::new(RequestQueue::new(4));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let waiter = {
            let q = q.clone();
            std::thread::spawn(move || {
                let _ = ready_tx.send(());
                let start = Instant::now();
                let has_work = q.wait_for_work(Duration::from_secs(60));
                let _ = done_tx.send((has_work, start.elapsed()));
            })
        };
        assert!(ready_rx.recv_timeout(Duration::from_secs(30)).is_ok());
        std::thread::sleep(Duration::from_millis(20));
        assert!(q.push(1, 0, "job").is_ok());
        let result = done_rx.recv_timeout(Duration::from_secs(30));
        let Ok((has_work, elapsed)) = result else {
            panic!("waiter was not woken: {result:?}");
        };
        assert!(has_work);
        assert!(elapsed < Duration::from_secs(60));
        assert!(waiter.join().is_ok());
    }

    #[test]
    fn notify_wakes_the_waiter_without_work() {
        let q: Arc<RequestQueue<()>> = Arc::new(RequestQueue::new(4));
        let (done_tx, done_rx) = mpsc::channel();
        let waiter = {
            let q = q.clone();
            std::thread::spawn(move || {
                let _ = done_tx.send(q.wait_for_work(Duration::from_secs(60)));
            })
        };
        // Whether notify lands before or during the wait, the waiter must return promptly.
        std::thread::sleep(Duration::from_millis(20));
        q.notify();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(false));
        assert!(waiter.join().is_ok());
        // The notification was consumed: the next wait times out.
        assert!(!q.wait_for_work(Duration::from_millis(10)));
    }

    #[test]
    fn concurrent_pushes_are_all_kept() {
        let q = Arc::new(RequestQueue::new(1000));
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    (0..100u64).all(|i| q.push(t * 1000 + i, (i % 3) as i32, ()).is_ok())
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().ok(), Some(true));
        }
        assert_eq!(q.len(), 400);
        let popped: Vec<i32> =
            std::iter::from_fn(|| q.pop_if(|_| true).map(|p| p.priority)).collect();
        assert_eq!(popped.len(), 400);
        assert!(popped.windows(2).all(|w| w[0] >= w[1]), "priority order");
    }
}
