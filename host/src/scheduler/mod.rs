//! The scheduler: one thread that owns the model, the executor and the KV cache, and runs
//! continuous batching. Requests arrive through the [`RequestQueue`]; tokens go back to each
//! request's handler over its own channel.

mod batch_loop;
pub mod choices;
mod sequence;

pub use batch_loop::SchedulerSettings;

use crate::admission::queue::RequestQueue;
use crate::model::generation::{FinishReason, GenerationParams};
use crate::model::logprobs::TokenLogprobs;
use crate::model::Model;
use crate::tracker::RequestTracker;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A validated request waiting for the scheduler.
pub struct Pending {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub params: GenerationParams,
    pub events: mpsc::UnboundedSender<SeqEvent>,
    pub received_at: Instant,
}

/// What the scheduler tells a request's handler.
#[derive(Debug, Clone)]
pub enum SeqEvent {
    /// Left the queue and joined the running batch.
    Scheduled,
    /// Log-probabilities of the prompt tokens after the first (when the parameters ask for
    /// them); sent once, before the first token.
    PromptLogprobs(Vec<f32>),
    /// A generated token; the last one carries how the generation ended.
    Token {
        id: u32,
        text: String,
        special: bool,
        /// When the parameters ask for them.
        logprobs: Option<TokenLogprobs>,
        finish: Option<Finish>,
    },
    Failed(String),
}

/// How a generation ended, sent with its last token.
#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: FinishReason,
    pub generated_text: String,
    pub generated_tokens: usize,
}

/// Live numbers the scheduler publishes for health and metrics, readable without locking.
#[derive(Default)]
pub struct SchedulerStats {
    pub running_sequences: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Milliseconds since `started` of the last loop iteration (stall detection).
    pub last_tick_ms: AtomicU64,
    pub steps: AtomicU64,
    pub alive: AtomicBool,
    pub started: std::sync::OnceLock<Instant>,
    /// Time to first token of recent requests, in ms (the last 1000).
    pub recent_ttft_ms: std::sync::Mutex<std::collections::VecDeque<f64>>,
    /// Sequences the executor failed (a forward pass or decoding error), since start.
    pub failed_sequences: AtomicU64,
    /// The last such failure: when, and its message.
    pub last_failure: std::sync::Mutex<Option<(Instant, String)>>,
}

impl SchedulerStats {
    pub fn ms_since_last_tick(&self) -> u64 {
        let Some(started) = self.started.get() else {
            return 0;
        };
        let now = started.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_tick_ms.load(Ordering::Relaxed))
    }

    pub fn record_ttft(&self, ms: f64) {
        let mut ring = self
            .recent_ttft_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if ring.len() >= 1000 {
            ring.pop_front();
        }
        ring.push_back(ms);
    }

    /// 99th percentile of recent times to first token, in ms (0 when none).
    pub fn p99_ttft_ms(&self) -> f64 {
        let ring = self
            .recent_ttft_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut values: Vec<f64> = ring.iter().copied().collect();
        drop(ring);
        if values.is_empty() {
            return 0.0;
        }
        values.sort_by(f64::total_cmp);
        values[((values.len() as f64 * 0.99).ceil() as usize).clamp(1, values.len()) - 1]
    }

    /// Counts `n` sequences failed by the executor with `message`.
    pub fn record_failure(&self, n: usize, message: &str) {
        self.failed_sequences.fetch_add(n as u64, Ordering::Relaxed);
        let mut last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some((Instant::now(), message.to_string()));
    }

    /// The last executor failure: how long ago, and its message.
    pub fn last_failure(&self) -> Option<(std::time::Duration, String)> {
        let last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().map(|(at, m)| (at.elapsed(), m.clone()))
    }

    pub fn kv_usage(&self) -> f64 {
        let total = self.kv_blocks_total.load(Ordering::Relaxed);
        if total == 0 {
            return 0.0;
        }
        self.kv_blocks_used.load(Ordering::Relaxed) as f64 / total as f64
    }
}

/// The handle the HTTP side holds: submit work, read stats, stop the loop.
pub struct Scheduler {
    pub queue: Arc<RequestQueue<Pending>>,
    pub stats: Arc<SchedulerStats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the scheduler thread.
    pub fn start(
        model: Arc<Model>,
        executor: Box<dyn crate::model::executor::Executor>,
        settings: SchedulerSettings,
        queue: Arc<RequestQueue<Pending>>,
        tracker: Arc<RequestTracker>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> std::io::Result<Scheduler> {
        let stats = Arc::new(SchedulerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (queue, stats, stop) = (queue.clone(), stats.clone(), stop.clone());
            std::thread::Builder::new()
                .name("cllm-scheduler".into())
                .spawn(move || {
                    batch_loop::run(
                        model, executor, settings, queue, stats, stop, tracker, metrics, ready_tx,
                    )
                })?
        };
        // Serve only once the loop runs, so /health is right at once.
        if ready_rx.recv().is_err() {
            return Err(std::io::Error::other(
                "the scheduler thread died while starting",
            ));
        }
        Ok(Scheduler {
            queue,
            stats,
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the loop to finish: it drains what is running and queued, then exits.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.queue.notify();
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.request_stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
