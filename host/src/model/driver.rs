//! A simple batch generation loop: every prompt enters at once, prompts are prefilled in
//! chunks, then all sequences decode together until each one finishes. The CLI and the tests
//! use it; the server's scheduler drives the same executor with requests coming and going.
//! Both plan their passes with [`super::batching`].

use super::batching::{self, Limits, RowUse, SeqView};
use super::error::ModelError;
use super::executor::{BatchEntry, ExecError, Executor, LogitRows, PassOutput};
use super::generation::{Generation, GenerationParams, TokenEvent};
use super::kv_cache::{BlockPool, KvCacheFull, SequenceKv};
use super::Model;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    KvFull(#[from] KvCacheFull),
    #[error("prompt {0} is empty")]
    EmptyPrompt(usize),
    #[error("prompt ({prompt} tokens) plus max_new_tokens ({max_new}) exceeds the context of {context} tokens")]
    TooLong {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
}

/// What one prompt produced.
pub struct Outcome {
    pub generation: Generation,
    /// Logits of the first generated step (before sampling changed them).
    pub first_logits: Vec<f32>,
}

struct Slot<'p> {
    prompt: &'p [u32],
    kv: SequenceKv,
    last: [u32; 1],
    generation: Generation,
    first_logits: Vec<f32>,
}

impl Slot<'_> {
    /// Tokens known so far: the prompt and every generated token (the last of which has yet
    /// to go through the model, as `last`).
    fn known(&self) -> usize {
        self.prompt.len() + self.generation.output_ids().len()
    }
}

/// Generates for every prompt together. `prefill_chunk` caps the prompt tokens a sequence
/// feeds per pass. `on_token(prompt_index, event)` sees every token as it is produced.
pub fn generate_batch(
    model: &Model,
    executor: &mut dyn Executor,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    prefill_chunk: usize,
    mut on_token: impl FnMut(usize, &TokenEvent),
) -> Result<Vec<Outcome>, GenerateError> {
    let context = model.config.max_position_embeddings;
    let mut blocks = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt(i));
        }
        if prompt.len() + params.max_new_tokens > context {
            return Err(GenerateError::TooLong {
                prompt: prompt.len(),
                max_new: params.max_new_tokens,
                context,
            });
        }
        blocks += BlockPool::blocks_for(prompt.len() + params.max_new_tokens);
    }
    executor.ensure_blocks(blocks)?;
    let vocab = model.config.vocab_size;
    let mut slots: Vec<Slot> = prompts
        .iter()
        .map(|prompt| Slot {
            prompt,
            kv: SequenceKv::new(),
            last: [0],
            generation: Generation::new(params.clone(), prompt, &model.eos_token_ids, vocab),
            first_logits: Vec::new(),
        })
        .collect();
    // Every prompt at once: no token budget, prompts fed `prefill_chunk` tokens a pass.
    let limits = Limits {
        max_batch_tokens: usize::MAX,
        prefill_chunk: prefill_chunk.max(1),
    };
    let mut out = PassOutput::default();
    loop {
        let views: Vec<SeqView> = slots
            .iter()
            .map(|slot| SeqView {
                unfed: if slot.generation.finished().is_some() || params.max_new_tokens == 0 {
                    0
                } else {
                    slot.known() - slot.kv.len()
                },
                kv_len: slot.kv.len(),
                kv_blocks: slot.kv.blocks().len(),
            })
            .collect();
        let planned = batching::plan(&views, &limits);
        let mut batch = Vec::with_capacity(planned.len());
        let mut owners = Vec::with_capacity(planned.len());
        let mut full = None;
        let mut planned_iter = planned.iter().peekable();
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(&(_, n)) = planned_iter.next_if(|(j, _)| *j == i) else {
                continue;
            };
            let (fed, known) = (slot.kv.len(), slot.known());
            let prompt: &[u32] = slot.prompt;
            let tokens: &[u32] = if fed < prompt.len() {
                &prompt[fed..fed + n]
            } else {
                &slot.last
            };
            if let Err(e) = executor.blocks_mut().reserve(&mut slot.kv, tokens.len()) {
                full = Some(e);
                break;
            }
            // The first sample keeps its row (`first_logits`); greedy steps after it need only
            // the argmax.
            let generation = &slot.generation;
            let argmax_only = generation.needs_only_argmax() && !generation.output_ids().is_empty();
            let rows = batching::logit_rows(fed, n, known, false, argmax_only);
            owners.push((i, rows, fed, n, known));
            batch.push(BatchEntry {
                tokens,
                kv: &mut slot.kv,
                logits: rows,
            });
        }
        if let Some(e) = full {
            drop(batch);
            release_all(executor, &mut slots);
            return Err(e.into());
        }
        if batch.is_empty() {
            break;
        }
        let result = executor.forward(&model.config, &model.weights, &mut batch, &mut out);
        drop(batch);
        if let Err(e) = result {
            release_all(executor, &mut slots);
            return Err(e.into());
        }
        let mut rows = out.logits.chunks_exact_mut(vocab);
        let mut chosen = out
            .argmax
            .iter()
            .copied()
            .zip(out.argmax_logprobs.iter().copied());
        for (i, got, fed, n, known) in owners {
            let prompt_len = slots[i].prompt.len();
            let mut sample = None;
            for row_use in batching::row_uses(got, fed, n, prompt_len, known) {
                let row = rows.next();
                if row_use == RowUse::Sample {
                    sample = row;
                }
            }
            let slot = &mut slots[i];
            let stepped = if got == LogitRows::Argmax {
                let Some((id, logprob)) = chosen.next() else {
                    continue;
                };
                slot.generation.step_chosen(id, logprob, &model.tokenizer)
            } else {
                let Some(row) = sample else { continue };
                if slot.generation.output_ids().is_empty() {
                    slot.first_logits = row.to_vec();
                }
                slot.generation.step(row, &model.tokenizer)
            };
            let event = match stepped {
                Ok(event) => event,
                Err(e) => {
                    release_all(executor, &mut slots);
                    return Err(e.into());
                }
            };
            slot.last = [event.id];
            if event.finished.is_some() {
                executor.blocks_mut().release(&mut slot.kv);
            }
            on_token(i, &event);
        }
    }
    release_all(executor, &mut slots);
    Ok(slots
        .into_iter()
        .map(|s| Outcome {
            generation: s.generation,
            first_logits: s.first_logits,
        })
        .collect())
}

/// Gives every slot's blocks back: the executor and its cache outlive one call.
fn release_all(executor: &mut dyn Executor, slots: &mut [Slot]) {
    for slot in slots {
        executor.blocks_mut().release(&mut slot.kv);
    }
}
