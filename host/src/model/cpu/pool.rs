//! A small persistent thread pool for the executor's data-parallel loops.
//!
//! [`ThreadPool::run`] publishes a job (a borrowed closure and a task count); the caller and
//! the workers then claim task indices from one shared atomic word until none are left, and
//! `run` returns once every claimed task has finished. Decoding issues ~100 jobs per token
//! back to back, so idle workers first spin for a short while (a wake-up through the kernel
//! costs several microseconds) and only then sleep on a condvar, so an idle pool burns no CPU.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

type Task = dyn Fn(usize) + Sync;

/// How long an idle worker spins for the next job before it goes to sleep.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// Runs `n_tasks` independent tasks across the pool's threads, the caller included.
pub struct ThreadPool {
    threads: usize,
    /// `None` for a one-thread pool, which runs every job inline.
    shared: Option<Arc<Shared>>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises jobs; a `run` that finds it taken runs its job inline instead.
    run_lock: Mutex<()>,
}

/// The job being run: its closure with the borrow's lifetime erased, and its task count.
#[derive(Clone, Copy)]
struct Job {
    task: Option<NonNull<Task>>,
    n_tasks: usize,
}

/// State shared between the caller of `run` and the workers.
struct Shared {
    /// `epoch << 32 | remaining`: the job's generation and how many of its tasks are still
    /// unclaimed. A task is claimed by a compare-exchange that decrements `remaining` while
    /// the epoch is unchanged, so a worker that wakes up late can never claim a task of a job
    /// other than the one it saw.
    claim: AtomicU64,
    /// Written by `run` only while no task can be claimed (`remaining == 0` and every task of
    /// the previous job finished); read by a worker only after it claimed a task.
    job: UnsafeCell<Job>,
    /// Tasks of the current job that have finished (or panicked).
    done: AtomicUsize,
    /// The first panic raised by a task of the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    shutdown: AtomicBool,
    /// Whether tasks are timed (see [`ThreadPool::set_profiling`]).
    profiling: AtomicBool,
    /// Nanoseconds spent inside tasks of pooled jobs, summed over threads, while profiling.
    busy_ns: AtomicU64,
    /// Pooled jobs run, and their wall time from publication to the last task's end.
    runs: AtomicU64,
    wall_ns: AtomicU64,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is the only field that is not `Sync` by itself. It is written only by the
// thread holding `run_lock`, while no task is claimable, and it is read only by a thread that
// has just claimed a task, which happens after the write (the claim's acquire pairs with the
// release that published the job). The closure it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the pointer in `job` is only dereferenced under that protocol.
unsafe impl Send for Shared {}

const REMAINING_MASK: u64 = u32::MAX as u64;

fn epoch_of(claim: u64) -> u64 {
    claim >> 32
}

impl Shared {
    /// Claims and runs tasks of the job with `epoch` until none is left.
    fn work(&self, epoch: u64) {
        let mut current = self.claim.load(Ordering::Acquire);
        loop {
            let remaining = current & REMAINING_MASK;
            if epoch_of(current) != epoch || remaining == 0 {
                return;
            }
            match self.claim.compare_exchange_weak(
                current,
                current - 1,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: we hold a claimed task of the current job, so `run` is waiting
                    // for it and does not write `job` (see `Shared`'s Sync impl).
                    let job = unsafe { *self.job.get() };
                    self.run_task(job, job.n_tasks - remaining as usize);
                    current = self.claim.load(Ordering::Acquire);
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn run_task(&self, job: Job, index: usize) {
        if let Some(task) = job.task {
            // SAFETY: `run` keeps the closure alive until `done` counts every task, and this
            // task is not counted yet.
            let task = unsafe { task.as_ref() };
            let start = self.profiling.load(Ordering::Relaxed).then(Instant::now);
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| task(index))) {
                let mut slot = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                slot.get_or_insert(payload);
            }
            if let Some(start) = start {
                let ns = start.elapsed().as_nanos() as u64;
                self.busy_ns.fetch_add(ns, Ordering::Relaxed);
            }
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Waits until a job newer than `seen` is published (or the pool shuts down).
    fn wait_for_job(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = epoch_of(self.claim.load(Ordering::Acquire));
            if epoch != seen {
                return epoch;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN_BEFORE_SLEEP {
                break;
            }
        }
        let mut guard = self
            .sleep_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let epoch = loop {
            // SeqCst pairs with `publish`: either we see the new epoch here, or `publish`
            // sees us in `sleepers` and notifies under the lock.
            let epoch = epoch_of(self.claim.load(Ordering::SeqCst));
            if epoch != seen || self.shutdown.load(Ordering::SeqCst) {
                break epoch;
            }
            guard = self
                .wake
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        epoch
    }

    /// Makes `claim` visible to the workers and wakes any that sleep.
    fn publish(&self, claim: u64) {
        self.claim.store(claim, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self
                .sleep_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.wake.notify_all();
        }
    }
}

fn worker_loop(shared: &Shared) {
    let mut seen = 0;
    loop {
        seen = shared.wait_for_job(seen);
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        shared.work(seen);
    }
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one); 0 means one per core.
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let mut pool = ThreadPool {
            threads,
            shared: None,
            workers: Vec::new(),
            run_lock: Mutex::new(()),
        };
        if threads > 1 {
            let shared = Arc::new(Shared {
                claim: AtomicU64::new(0),
                job: UnsafeCell::new(Job {
                    task: None,
                    n_tasks: 0,
                }),
                done: AtomicUsize::new(0),
                panic: Mutex::new(None),
                shutdown: AtomicBool::new(false),
                profiling: AtomicBool::new(false),
                busy_ns: AtomicU64::new(0),
                runs: AtomicU64::new(0),
                wall_ns: AtomicU64::new(0),
                sleepers: AtomicUsize::new(0),
                sleep_lock: Mutex::new(()),
                wake: Condvar::new(),
            });
            for i in 1..threads {
                let shared = Arc::clone(&shared);
                let spawned = thread::Builder::new()
                    .name(format!("cllm-pool-{i}"))
                    .spawn(move || worker_loop(&shared));
                match spawned {
                    Ok(handle) => pool.workers.push(handle),
                    // Could not get another OS thread: run with the ones we have.
                    Err(_) => break,
                }
            }
            pool.threads = pool.workers.len() + 1;
            if !pool.workers.is_empty() {
                pool.shared = Some(shared);
            }
        }
        pool
    }

    /// How many threads (the caller included) share the work.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Starts or stops timing pooled jobs (see [`ThreadPool::times`]); off by default, since
    /// reading the clock around every task costs a little.
    pub fn set_profiling(&self, on: bool) {
        if let Some(shared) = &self.shared {
            shared.profiling.store(on, Ordering::Relaxed);
        }
    }

    /// Time spent in pooled jobs since the last [`ThreadPool::reset_times`], while profiling.
    pub fn times(&self) -> PoolTimes {
        let Some(shared) = &self.shared else {
            return PoolTimes::default();
        };
        PoolTimes {
            threads: self.threads,
            runs: shared.runs.load(Ordering::Relaxed),
            wall_ns: shared.wall_ns.load(Ordering::Relaxed),
            busy_ns: shared.busy_ns.load(Ordering::Relaxed),
        }
    }

    pub fn reset_times(&self) {
        if let Some(shared) = &self.shared {
            for counter in [&shared.runs, &shared.wall_ns, &shared.busy_ns] {
                counter.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Calls `task(i)` once for every `i` in `0..n_tasks` and returns when all are done.
    ///
    /// Tasks run concurrently on the pool's threads, in no particular order. If a task panics,
    /// the remaining tasks still run and the first panic is re-raised here. A `run` issued
    /// while another is in progress (from another thread, or from inside a task) runs its
    /// tasks inline on its own thread.
    pub fn run(&self, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        let Some(shared) = self.shared.as_deref() else {
            return run_inline(n_tasks, task);
        };
        if n_tasks == 1 || n_tasks > u32::MAX as usize {
            return run_inline(n_tasks, task);
        }
        let guard = match self.run_lock.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return run_inline(n_tasks, task),
        };

        let started = shared.profiling.load(Ordering::Relaxed).then(Instant::now);
        let task_ptr = NonNull::from(task);
        // SAFETY: only the trait object's lifetime bound changes. The pointer is dereferenced
        // only by threads holding a claimed task of this job, and we do not return (nor
        // unwind: every task runs under `catch_unwind`) before `done` counts all `n_tasks`,
        // i.e. before the last such use has ended, so the borrow outlives every use.
        let task_ptr: NonNull<Task> = unsafe { std::mem::transmute(task_ptr) };
        let epoch = epoch_of(shared.claim.load(Ordering::Relaxed)).wrapping_add(1) & REMAINING_MASK;
        shared.done.store(0, Ordering::Relaxed);
        // SAFETY: we hold `run_lock`, the previous job's tasks have all finished and none is
        // claimable (`remaining == 0`), so no other thread reads `job` now.
        unsafe {
            *shared.job.get() = Job {
                task: Some(task_ptr),
                n_tasks,
            };
        }
        shared.publish(epoch << 32 | n_tasks as u64);

        shared.work(epoch);
        let mut spins = 0u32;
        while shared.done.load(Ordering::Acquire) < n_tasks {
            if spins < 10_000 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        if let Some(started) = started {
            let ns = started.elapsed().as_nanos() as u64;
            shared.wall_ns.fetch_add(ns, Ordering::Relaxed);
            shared.runs.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: every task has finished and none is claimable; we still hold `run_lock`.
        unsafe {
            *shared.job.get() = Job {
                task: None,
                n_tasks: 0,
            };
        }
        let payload = shared
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(guard);
        if let Some(payload) = payload {
            panic::resume_unwind(payload);
        }
    }
}

/// Where the pool's time went while profiling.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolTimes {
    pub threads: usize,
    /// Jobs spread over the threads (jobs run inline are not counted).
    pub runs: u64,
    /// Their wall time, publication to last task's end.
    pub wall_ns: u64,
    /// Time inside their tasks, summed over threads.
    pub busy_ns: u64,
}

impl PoolTimes {
    /// Thread time in pooled jobs not spent in a task: waking up, claiming, and waiting for
    /// the slowest thread (load imbalance).
    pub fn idle_ns(&self) -> u64 {
        (self.threads as u64 * self.wall_ns).saturating_sub(self.busy_ns)
    }
}

/// Runs every task on the calling thread, re-raising the first panic once all have run (the
/// same contract as the pooled path).
fn run_inline(n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let mut first_panic = None;
    for i in 0..n_tasks {
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| task(i))) {
            first_panic.get_or_insert(payload);
        }
    }
    if let Some(payload) = first_panic {
        panic::resume_unwind(payload);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        // Hold the run lock so no job is in flight while we stop the workers.
        let _guard = self.run_lock.lock().unwrap_or_else(PoisonError::into_inner);
        shared.shutdown.store(true, Ordering::SeqCst);
        let epoch = epoch_of(shared.claim.load(Ordering::Relaxed)).wrapping_add(1) & REMAINING_MASK;
        shared.publish(epoch << 32);
        for worker in self.workers.drain(..) {
            // A worker never panics (tasks run under catch_unwind), so there is nothing to
            // report from a failed join.
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once() {
        for threads in [1, 2, 3, 4] {
            let pool = ThreadPool::new(threads);
            for n in [0, 1, 2, 3, 7, 64, 1000] {
                let counts: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                pool.run(n, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn borrows_local_data_back_to_back() {
        let pool = ThreadPool::new(2);
        let mut total = 0u64;
        for round in 0..20_000u64 {
            let data: Vec<u64> = (0..8).map(|i| i + round).collect();
            let sum = AtomicU64::new(0);
            pool.run(data.len(), &|i| {
                sum.fetch_add(data[i], Ordering::Relaxed);
            });
            total += sum.load(Ordering::Relaxed);
        }
        let expected: u64 = (0..20_000u64)
            .map(|r| (0..8).map(|i| i + r).sum::<u64>())
            .sum();
        assert_eq!(total, expected);
    }

    #[test]
    fn survives_sleeping_workers() {
        let pool = ThreadPool::new(3);
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(2));
            let hits = AtomicUsize::new(0);
            pool.run(16, &|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 16);
        }
    }

    #[test]
    fn panic_propagates_and_pool_recovers() {
        let pool = ThreadPool::new(2);
        let ran = AtomicUsize::new(0);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(32, &|i| {
                ran.fetch_add(1, Ordering::Relaxed);
                if i == 5 {
                    panic!("task 5 failed");
                }
            })
        }));
        let payload = result.expect_err("the task's panic must reach the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"task 5 failed"));
        assert_eq!(ran.load(Ordering::Relaxed), 32);
        let hits = AtomicUsize::new(0);
        pool.run(10, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn nested_and_concurrent_runs_do_not_deadlock() {
        let pool = ThreadPool::new(2);
        let hits = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(hits.load(Ordering::Relaxed), 12);

        let hits = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..500 {
                        pool.run(5, &|_| {
                            hits.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(hits.load(Ordering::Relaxed), 3 * 500 * 5);
    }

    #[test]
    fn uses_the_workers() {
        let pool = ThreadPool::new(2);
        assert_eq!(pool.threads(), 2);
        let caller = thread::current().id();
        let off_caller = AtomicUsize::new(0);
        // Each task waits a little so the worker gets a chance to claim some.
        for _ in 0..50 {
            pool.run(8, &|_| {
                if thread::current().id() != caller {
                    off_caller.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(200));
            });
        }
        assert!(off_caller.load(Ordering::Relaxed) > 0);
    }
}
