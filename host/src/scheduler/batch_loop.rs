//! The continuous-batching loop. Each iteration: drop sequences whose client has gone, admit
//! queued requests while KV blocks allow, plan one forward pass under the token budget (every
//! decoding sequence gets its token first, prefill chunks share what is left), preempt the
//! newest sequences if the cache cannot hold the plan, run the pass, and stream the tokens.

use super::choices::{choose_all, Pick};
use super::sequence::Sequence;
use super::{Finish, Pending, SchedulerStats, SeqEvent};
use crate::admission::queue::RequestQueue;
use crate::metrics::Metrics;
use crate::model::batching::{self, Limits, RowUse, SeqView};
use crate::model::executor::{BatchEntry, Executor, LogitRows, PassOutput};
use crate::model::kv_cache::BlockPool;
use crate::model::logprobs::logprob_of;
use crate::model::Model;
use crate::tracker::{RequestTracker, Stage};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Limits the loop works within.
#[derive(Clone, Debug)]
pub struct SchedulerSettings {
    pub max_running_sequences: usize,
    /// Tokens per forward pass (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Most prompt tokens one sequence feeds per pass.
    pub prefill_chunk: usize,
    /// Pause after each pass (tests and demos only).
    pub step_delay: Duration,
    /// Also publish vLLM's gauges, labelled with this model name (`metrics.vllm_compatible`).
    pub vllm_model_name: Option<String>,
}

/// The loop's metric handles, registered once (a step only bumps them).
struct LoopMetrics {
    running: metrics::Gauge,
    kv_usage: metrics::Gauge,
    queue_size: metrics::Gauge,
    queue_wait: metrics::Histogram,
    prompt_tokens: metrics::Counter,
    batch_size: metrics::Histogram,
    ttft: metrics::Histogram,
    itl: metrics::Histogram,
    generated_tokens: metrics::Counter,
    failures: metrics::Counter,
    vllm: Option<VllmGauges>,
}

/// The gauges gateway endpoint pickers read, under vLLM's names.
struct VllmGauges {
    waiting: metrics::Gauge,
    running: metrics::Gauge,
    kv_usage: metrics::Gauge,
}

impl VllmGauges {
    fn new(m: &Metrics, model_name: &str, block_size: usize, blocks: usize) -> Self {
        let model = || vec![("model_name", model_name.to_string())];
        let mut info = model();
        info.push(("block_size", block_size.to_string()));
        info.push(("num_gpu_blocks", blocks.to_string()));
        m.gauge_with("vllm:cache_config_info", &info).set(1.0);
        VllmGauges {
            waiting: m.gauge_with("vllm:num_requests_waiting", &model()),
            running: m.gauge_with("vllm:num_requests_running", &model()),
            kv_usage: m.gauge_with("vllm:kv_cache_usage_perc", &model()),
        }
    }
}

impl LoopMetrics {
    fn new(m: &Metrics) -> Self {
        LoopMetrics {
            running: m.gauge("cllm_running_sequences"),
            kv_usage: m.gauge("cllm_kv_cache_usage_ratio"),
            queue_size: m.gauge("cllm_queue_size"),
            queue_wait: m.histogram("cllm_queue_wait_seconds", &[]),
            prompt_tokens: m.counter("cllm_prompt_tokens_total", &[]),
            batch_size: m.histogram("cllm_batch_size", &[]),
            ttft: m.histogram("cllm_time_to_first_token_seconds", &[]),
            itl: m.histogram("cllm_inter_token_latency_seconds", &[]),
            generated_tokens: m.counter("cllm_generated_tokens_total", &[]),
            failures: m.counter("cllm_sequence_failures_total", &[]),
            vllm: None,
        }
    }
}

struct Loop {
    model: Arc<Model>,
    settings: SchedulerSettings,
    queue: Arc<RequestQueue<Pending>>,
    stats: Arc<SchedulerStats>,
    tracker: Arc<RequestTracker>,
    metrics: LoopMetrics,
    executor: Box<dyn Executor>,
    running: Vec<Sequence>,
    /// Sequences pushed out of the cache; they run again before anything new is admitted.
    preempted: VecDeque<Sequence>,
    /// The last pass's logit rows and greedy choices.
    out: PassOutput,
}

/// The loop's body: owns everything it is handed until the server stops.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    model: Arc<Model>,
    executor: Box<dyn Executor>,
    settings: SchedulerSettings,
    queue: Arc<RequestQueue<Pending>>,
    stats: Arc<SchedulerStats>,
    stop: Arc<AtomicBool>,
    tracker: Arc<RequestTracker>,
    metrics: Arc<Metrics>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let _ = stats.started.set(Instant::now());
    stats
        .kv_blocks_total
        .store(executor.blocks().total_blocks(), Ordering::Relaxed);
    let mut state = Loop {
        executor,
        model,
        settings,
        queue,
        stats,
        tracker,
        metrics: LoopMetrics::new(&metrics),
        running: Vec::new(),
        preempted: VecDeque::new(),
        out: PassOutput::default(),
    };
    if let Some(name) = &state.settings.vllm_model_name {
        let blocks = state.executor.blocks().total_blocks();
        let gauges = VllmGauges::new(&metrics, name, crate::model::kv_cache::BLOCK_SIZE, blocks);
        state.metrics.vllm = Some(gauges);
    }
    state.stats.alive.store(true, Ordering::SeqCst);
    let _ = ready.send(());
    loop {
        state.tick();
        state.drop_gone_clients();
        state.admit();
        if state.running.is_empty() {
            if stop.load(Ordering::SeqCst) && state.queue.is_empty() && state.preempted.is_empty() {
                break;
            }
            state.queue.wait_for_work(Duration::from_millis(50));
            continue;
        }
        state.step();
    }
    state.stats.alive.store(false, Ordering::SeqCst);
}

impl Loop {
    fn tick(&self) {
        if let Some(started) = self.stats.started.get() {
            let ms = started.elapsed().as_millis() as u64;
            self.stats.last_tick_ms.store(ms, Ordering::Relaxed);
        }
        let s = &self.stats;
        s.running_sequences
            .store(self.running.len(), Ordering::Relaxed);
        s.kv_blocks_used
            .store(self.executor.blocks().used_blocks(), Ordering::Relaxed);
        self.metrics.running.set(self.running.len() as f64);
        self.metrics.kv_usage.set(s.kv_usage());
        self.metrics.queue_size.set(self.queue.len() as f64);
        if let Some(v) = &self.metrics.vllm {
            // vLLM counts preempted requests as waiting.
            v.waiting
                .set((self.queue.len() + self.preempted.len()) as f64);
            v.running.set(self.running.len() as f64);
            v.kv_usage.set(s.kv_usage());
        }
    }

    fn drop_gone_clients(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].client_gone() {
                let mut seq = self.running.remove(i);
                self.executor.blocks_mut().release(&mut seq.kv);
                self.tracker.record_with(
                    &seq.pending.request_id,
                    Stage::Cancelled,
                    "client disconnected",
                );
            } else {
                i += 1;
            }
        }
        self.preempted.retain(|seq| !seq.client_gone());
    }

    fn admit(&mut self) {
        while self.running.len() < self.settings.max_running_sequences {
            if let Some(seq) = self.preempted.front() {
                if !self.try_reserve_prompt_of(seq.tokens.len()) {
                    return;
                }
                let Some(mut seq) = self.preempted.pop_front() else {
                    return;
                };
                if self
                    .executor
                    .blocks_mut()
                    .reserve(&mut seq.kv, seq.tokens.len())
                    .is_err()
                {
                    self.preempted.push_front(seq);
                    return;
                }
                self.tracker
                    .record(&seq.pending.request_id, Stage::Scheduled);
                self.running.push(seq);
                continue;
            }
            let free = self.executor.blocks().free_blocks();
            let Some(popped) = self
                .queue
                .pop_if(|p| BlockPool::blocks_for(p.prompt_ids.len() + 1) <= free)
            else {
                return;
            };
            let pending = popped.item;
            if pending.events.is_closed() {
                self.tracker.record_with(
                    &pending.request_id,
                    Stage::Cancelled,
                    "client disconnected",
                );
                continue;
            }
            self.metrics.queue_wait.record(popped.waited.as_secs_f64());
            self.metrics
                .prompt_tokens
                .increment(pending.prompt_ids.len() as u64);
            let mut seq = Sequence::new(pending, &self.model);
            if self
                .executor
                .blocks_mut()
                .reserve(&mut seq.kv, seq.tokens.len())
                .is_err()
            {
                // pop_if checked the room; nothing else takes blocks on this thread.
                seq.send(SeqEvent::Failed("KV cache accounting error".into()));
                continue;
            }
            self.tracker
                .record(&seq.pending.request_id, Stage::Scheduled);
            seq.send(SeqEvent::Scheduled);
            self.running.push(seq);
        }
    }

    fn try_reserve_prompt_of(&self, tokens: usize) -> bool {
        BlockPool::blocks_for(tokens + 1) <= self.executor.blocks().free_blocks()
    }

    /// The running sequences as the batching core sees them.
    fn views(&self) -> Vec<SeqView> {
        self.running
            .iter()
            .map(|seq| SeqView {
                unfed: seq.unfed(),
                kv_len: seq.kv.len(),
                kv_blocks: seq.kv.blocks().len(),
            })
            .collect()
    }

    fn step(&mut self) {
        let limits = Limits {
            max_batch_tokens: self.settings.max_batch_tokens,
            prefill_chunk: self.settings.prefill_chunk,
        };
        let free = self.executor.blocks().free_blocks();
        let (plan, preempt) = batching::plan_within(&self.views(), &limits, free);
        for _ in 0..preempt {
            self.preempt_newest();
        }
        for &(i, n) in &plan {
            if let Err(e) = self
                .executor
                .blocks_mut()
                .reserve(&mut self.running[i].kv, n)
            {
                self.fail_all(&format!("KV cache exhausted: {e}"));
                return;
            }
        }
        // Per running sequence: the logit rows this pass gives it (none when not planned) and
        // the position of the first token it feeds.
        let mut rows_of = vec![(LogitRows::None, 0); self.running.len()];
        let result = {
            let mut batch: Vec<BatchEntry> = Vec::with_capacity(plan.len());
            let mut planned = plan.iter().peekable();
            for (i, seq) in self.running.iter_mut().enumerate() {
                let Some(&(_, n)) = planned.next_if(|(j, _)| *j == i) else {
                    continue;
                };
                let rows = batching::logit_rows(
                    seq.fed,
                    n,
                    seq.tokens.len(),
                    seq.wants_prompt_logprobs(),
                    seq.generation.needs_only_argmax(),
                );
                rows_of[i] = (rows, seq.fed);
                let tokens = &seq.tokens[seq.fed..seq.fed + n];
                batch.push(BatchEntry {
                    tokens,
                    kv: &mut seq.kv,
                    logits: rows,
                });
            }
            self.metrics.batch_size.record(batch.len() as f64);
            let model = &self.model;
            self.executor
                .forward(&model.config, &model.weights, &mut batch, &mut self.out)
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            match e.entry() {
                // Found before the pass ran: only that sequence fails; the others run again
                // at the next step with the blocks they already reserved.
                Some(entry) => match plan.get(entry) {
                    Some(&(i, _)) => self.fail_one(i, &format!("forward pass failed: {e}")),
                    None => self.fail_all(&format!("forward pass failed: {e}")),
                },
                None => self.fail_all(&format!("forward pass failed: {e}")),
            }
            return;
        }
        for &(i, n) in &plan {
            self.running[i].fed += n;
        }
        self.emit_tokens(&rows_of);
        // Publish the freed blocks now rather than at the next iteration.
        self.tick();
        if !self.settings.step_delay.is_zero() {
            std::thread::sleep(self.settings.step_delay);
        }
    }

    /// Samples for every sequence that produced logits, streams the token, retires finished ones.
    /// `rows_of[i]`: which logit rows sequence `i` got, and the position its tokens began at.
    fn emit_tokens(&mut self, rows_of: &[(LogitRows, usize)]) {
        let vocab = self.model.config.vocab_size;
        let mut rows = self.out.logits.chunks_exact_mut(vocab);
        // The executor's contract: one choice per entry that asked for one.
        debug_assert_eq!(
            self.out.argmax.len(),
            rows_of.iter().filter(|r| r.0 == LogitRows::Argmax).count()
        );
        let logprobs = self.out.argmax_logprobs.iter().copied();
        let mut chosen = self.out.argmax.iter().copied().zip(logprobs);
        // Each sequence's prompt log-probabilities, and what it gets toward its next token.
        let mut picks = Vec::with_capacity(self.running.len());
        for (i, seq) in self.running.iter_mut().enumerate() {
            let (rows_got, fed) = rows_of[i];
            let prompt_len = seq.pending.prompt_ids.len();
            let uses =
                batching::row_uses(rows_got, fed, seq.fed - fed, prompt_len, seq.tokens.len());
            let mut pick = Pick::None;
            for row_use in uses {
                let Some(row) = rows.next() else { break };
                match row_use {
                    RowUse::PromptLogprob(pos) => {
                        // A recompute after preemption does not redo them.
                        if seq.prompt_logprobs.len() == pos {
                            let next = seq.tokens[pos + 1];
                            seq.prompt_logprobs.push(logprob_of(row, next));
                        }
                    }
                    RowUse::Sample => pick = Pick::Row(row),
                    RowUse::Skip => {}
                }
            }
            // A greedy choice made by the executor rather than a row.
            if rows_got == LogitRows::Argmax {
                if let Some((token, logprob)) = chosen.next() {
                    pick = Pick::Chosen(token, logprob);
                }
            }
            picks.push(pick);
        }
        let generations = self.running.iter_mut().map(|seq| &mut seq.generation);
        let choices = choose_all(self.executor.host_pool(), generations, picks);

        let mut finished = Vec::new();
        let now = Instant::now();
        for ((i, seq), choice) in self.running.iter_mut().enumerate().zip(choices) {
            let Some(choice) = choice else { continue };
            // Before the first token, whichever pass samples it (the prompt's last chunk may
            // have needed no rows of its own).
            if seq.pending.params.prompt_logprobs && seq.last_token_at.is_none() {
                seq.send(SeqEvent::PromptLogprobs(seq.prompt_logprobs.clone()));
            }
            let id = &seq.pending.request_id;
            let event = match seq.generation.accept(choice, &self.model.tokenizer) {
                Ok(event) => event,
                Err(e) => {
                    let message = format!("decoding failed: {e}");
                    tracing::error!(request_id = %id, message, "sequence failed");
                    self.stats.record_failure(1, &message);
                    self.metrics.failures.increment(1);
                    seq.send(SeqEvent::Failed(message));
                    self.tracker.record_with(id, Stage::Failed, e.to_string());
                    finished.push(i);
                    continue;
                }
            };
            seq.tokens.push(event.id);
            match seq.last_token_at {
                None => {
                    self.tracker.record(id, Stage::FirstToken);
                    let ttft = now - seq.pending.received_at;
                    self.metrics.ttft.record(ttft.as_secs_f64());
                    self.stats.record_ttft(ttft.as_secs_f64() * 1e3);
                }
                Some(prev) => self.metrics.itl.record((now - prev).as_secs_f64()),
            }
            seq.last_token_at = Some(now);
            self.metrics.generated_tokens.increment(1);
            let special = self.model.tokenizer.is_special(event.id);
            let finish = event.finished.map(|reason| Finish {
                reason,
                generated_text: seq.generation.text().to_string(),
                generated_tokens: seq.generation.output_ids().len(),
            });
            // Recorded before the last token goes out, so a client that has its answer
            // always finds the request finished.
            if let Some(reason) = event.finished {
                self.tracker
                    .record_with(id, Stage::Finished, reason.as_str());
            }
            let delivered = seq.send(SeqEvent::Token {
                id: event.id,
                text: event.text,
                special,
                logprobs: event.logprobs,
                finish,
            });
            if event.finished.is_some() {
                finished.push(i);
            } else if !delivered {
                self.tracker
                    .record_with(id, Stage::Cancelled, "client disconnected");
                finished.push(i);
            }
        }
        for &i in finished.iter().rev() {
            let mut seq = self.running.remove(i);
            self.executor.blocks_mut().release(&mut seq.kv);
        }
    }

    fn preempt_newest(&mut self) {
        if let Some(mut seq) = self.running.pop() {
            self.executor.blocks_mut().release(&mut seq.kv);
            seq.reset_for_recompute();
            self.tracker
                .record(&seq.pending.request_id, Stage::Preempted);
            self.preempted.push_front(seq);
        }
    }

    /// Fails running sequence `i` alone: its request gets `message`, its blocks go back.
    fn fail_one(&mut self, i: usize, message: &str) {
        let mut seq = self.running.remove(i);
        tracing::error!(request_id = %seq.pending.request_id, message, "sequence failed; the others run on");
        self.stats.record_failure(1, message);
        self.metrics.failures.increment(1);
        self.executor.blocks_mut().release(&mut seq.kv);
        seq.send(SeqEvent::Failed(message.to_string()));
        self.tracker
            .record_with(&seq.pending.request_id, Stage::Failed, message);
    }

    fn fail_all(&mut self, message: &str) {
        tracing::error!(message, "scheduler step failed; failing the running batch");
        self.stats.record_failure(self.running.len(), message);
        self.metrics.failures.increment(self.running.len() as u64);
        for mut seq in self.running.drain(..) {
            self.executor.blocks_mut().release(&mut seq.kv);
            seq.send(SeqEvent::Failed(message.to_string()));
            self.tracker
                .record_with(&seq.pending.request_id, Stage::Failed, message);
        }
    }
}
