//! One sequence's generation state: sampling, stop conditions and the text streamed so far.
//! The scheduler (and the CLI's simple driver) feed it one row of logits per step.

use super::error::Result;
use super::logprobs::{token_logprobs, TokenLogprobs};
use super::sampling::{Sampler, SamplingParams};
use super::tokenizer::{ModelTokenizer, StreamDecoder};

#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop as soon as the generated text contains one of these.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Report the log-probability of every prompt token after the first.
    pub prompt_logprobs: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    EosToken,
    StopSequence,
}

impl FinishReason {
    /// The name TGI uses in `details.finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        }
    }
}

/// What one step produced for a sequence.
#[derive(Clone, Debug)]
pub struct TokenEvent {
    pub id: u32,
    /// Text this token completed (may be empty while a character is still partial).
    pub text: String,
    pub finished: Option<FinishReason>,
    /// When the parameters ask for them.
    pub logprobs: Option<TokenLogprobs>,
}

/// A token picked for a sequence, not yet appended.
#[derive(Clone, Debug)]
pub struct Choice {
    pub id: u32,
    /// When the parameters ask for them.
    pub logprobs: Option<TokenLogprobs>,
}

pub struct Generation {
    params: GenerationParams,
    sampler: Sampler,
    decoder: StreamDecoder,
    eos_token_ids: Vec<u32>,
    output_ids: Vec<u32>,
    text: String,
    finished: Option<FinishReason>,
    /// The unmodified logits of this step, kept when log-probabilities are asked for
    /// (sampling penalties change the row in place).
    raw_logits: Vec<f32>,
    top_scratch: Vec<(f32, u32)>,
}

impl Generation {
    pub fn new(
        params: GenerationParams,
        prompt_ids: &[u32],
        eos_token_ids: &[u32],
        vocab_size: usize,
    ) -> Self {
        let mut sampler = Sampler::new(params.sampling.clone(), vocab_size);
        for &id in prompt_ids {
            sampler.observe(id);
        }
        Generation {
            params,
            sampler,
            decoder: StreamDecoder::new(),
            eos_token_ids: eos_token_ids.to_vec(),
            output_ids: Vec::new(),
            text: String::new(),
            finished: None,
            raw_logits: Vec::new(),
            top_scratch: Vec::new(),
        }
    }

    /// Samples from `logits` (one row of vocab size), appends the token, checks stop conditions.
    pub fn step(&mut self, logits: &mut [f32], tokenizer: &ModelTokenizer) -> Result<TokenEvent> {
        let choice = self.choose(logits);
        self.accept(choice, tokenizer)
    }

    /// Samples the next token from `logits` (one row of vocab size, which sampling may change)
    /// with its log-probabilities when they are asked for, without appending it: the part of
    /// [`Generation::step`] that needs no tokenizer, so that the scheduler can run it for many
    /// sequences at once. [`Generation::accept`] appends the choice.
    pub fn choose(&mut self, logits: &mut [f32]) -> Choice {
        let Some(n) = self.params.logprobs else {
            let id = self.sampler.sample(logits);
            return Choice { id, logprobs: None };
        };
        self.raw_logits.clear();
        self.raw_logits.extend_from_slice(logits);
        let id = self.sampler.sample(logits);
        let logprobs = token_logprobs(&self.raw_logits, id, n, &mut self.top_scratch);
        Choice {
            id,
            logprobs: Some(logprobs),
        }
    }

    /// Appends a token [`Generation::choose`] picked and checks stop conditions.
    pub fn accept(&mut self, choice: Choice, tokenizer: &ModelTokenizer) -> Result<TokenEvent> {
        let mut event = self.push_token(choice.id, tokenizer)?;
        event.logprobs = choice.logprobs;
        Ok(event)
    }

    /// Whether the next token needs nothing but the argmax of its logits and, if asked, its
    /// own log-probability (greedy, no penalties, no alternatives' log-probabilities):
    /// [`LogitRows::Argmax`] then suffices, and the choice goes to [`Generation::step_chosen`]
    /// instead of a row to [`Generation::step`].
    ///
    /// [`LogitRows::Argmax`]: super::executor::LogitRows::Argmax
    pub fn needs_only_argmax(&self) -> bool {
        self.params.logprobs.unwrap_or(0) == 0 && self.sampler.takes_plain_argmax()
    }

    /// The choice the executor made greedily: `id` with `logprob`, its log-probability (kept
    /// when log-probabilities were asked for), as [`Generation::choose`] would return it.
    pub fn chosen(&self, id: u32, logprob: f32) -> Choice {
        Choice {
            id,
            logprobs: self.params.logprobs.map(|_| TokenLogprobs {
                logprob,
                top: Vec::new(),
            }),
        }
    }

    /// Appends `id`, the executor's greedy choice, with `logprob`, its log-probability (kept
    /// when log-probabilities were asked for): what [`Generation::step`] does with the row.
    pub fn step_chosen(
        &mut self,
        id: u32,
        logprob: f32,
        tokenizer: &ModelTokenizer,
    ) -> Result<TokenEvent> {
        let choice = self.chosen(id, logprob);
        self.accept(choice, tokenizer)
    }

    /// Appends `id` as if it had been sampled.
    pub fn push_token(&mut self, id: u32, tokenizer: &ModelTokenizer) -> Result<TokenEvent> {
        debug_assert!(self.finished.is_none(), "step after finish");
        self.sampler.observe_generated(id);
        self.output_ids.push(id);
        let is_eos = !self.params.ignore_eos && self.eos_token_ids.contains(&id);
        let mut piece = self.decoder.push(tokenizer, id)?;
        let length_done = self.output_ids.len() >= self.params.max_new_tokens;
        if is_eos || length_done {
            piece.push_str(&self.decoder.finish(tokenizer)?);
        }
        let search_from = self.text.len();
        self.text.push_str(&piece);
        self.finished = if self.stop_found(search_from) {
            Some(FinishReason::StopSequence)
        } else if is_eos {
            Some(FinishReason::EosToken)
        } else if length_done {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(TokenEvent {
            id,
            text: piece,
            finished: self.finished,
            logprobs: None,
        })
    }

    /// Whether a stop sequence ends within the text added after `search_from`.
    fn stop_found(&self, search_from: usize) -> bool {
        self.params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .any(|stop| {
                // Only look where a match could involve the new text.
                let mut start = search_from.saturating_sub(stop.len() - 1);
                while !self.text.is_char_boundary(start) {
                    start -= 1;
                }
                self.text[start..].contains(stop.as_str())
            })
    }

    pub fn params(&self) -> &GenerationParams {
        &self.params
    }

    pub fn output_ids(&self) -> &[u32] {
        &self.output_ids
    }

    /// The generated text so far (special tokens skipped, stop sequence included).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }
}
