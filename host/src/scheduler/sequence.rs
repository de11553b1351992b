//! A request inside the scheduler: its tokens, cache blocks and generation state.

use super::{Pending, SeqEvent};
use crate::model::generation::Generation;
use crate::model::kv_cache::SequenceKv;
use crate::model::Model;
use std::time::Instant;

pub struct Sequence {
    pub pending: Pending,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    /// How many of `tokens` have their keys and values in the cache.
    pub fed: usize,
    pub kv: SequenceKv,
    pub generation: Generation,
    pub last_token_at: Option<Instant>,
    /// Log-probabilities of prompt tokens 1.. as prefill computes them (when asked for).
    pub prompt_logprobs: Vec<f32>,
}

impl Sequence {
    pub fn new(pending: Pending, model: &Model) -> Self {
        let generation = Generation::new(
            pending.params.clone(),
            &pending.prompt_ids,
            &model.eos_token_ids,
            model.config.vocab_size,
        );
        Sequence {
            tokens: pending.prompt_ids.clone(),
            fed: 0,
            kv: SequenceKv::new(),
            generation,
            pending,
            last_token_at: None,
            prompt_logprobs: Vec::new(),
        }
    }

    /// Whether this pass must compute logits for every token fed: prompt log-probabilities are
    /// asked for and not all computed yet (a recompute after preemption does not redo them).
    pub fn wants_prompt_logprobs(&self) -> bool {
        self.pending.params.prompt_logprobs
            && self.prompt_logprobs.len() + 1 < self.pending.prompt_ids.len()
    }

    /// Tokens not yet in the cache (the whole prompt at first, then the last sampled token).
    pub fn unfed(&self) -> usize {
        self.tokens.len() - self.fed
    }

    /// The client went away (its receiver was dropped).
    pub fn client_gone(&self) -> bool {
        self.pending.events.is_closed()
    }

    /// Sends an event; false when the client has gone.
    pub fn send(&self, event: SeqEvent) -> bool {
        self.pending.events.send(event).is_ok()
    }

    /// Forgets the cached keys and values: they are recomputed when the sequence runs again.
    pub fn reset_for_recompute(&mut self) {
        self.fed = 0;
    }
}
