//! A simple batch generation loop: every prompt enters at once, prompts are prefilled in
//! chunks, then all sequences decode together until each one finishes. The CLI and the tests
//! use it; the server's scheduler drives the same executor with requests coming and going.

use super::error::ModelError;
use super::executor::{BatchEntry, ExecError, Executor, LogitRows};
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
    prefilled: usize,
    kv: SequenceKv,
    last: [u32; 1],
    generation: Generation,
    first_logits: Vec<f32>,
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
            prefilled: 0,
            kv: SequenceKv::new(),
            last: [0],
            generation: Generation::new(params.clone(), prompt, &model.eos_token_ids, vocab),
            first_logits: Vec::new(),
        })
        .collect();
    let chunk = prefill_chunk.max(1);
    let mut logits = Vec::new();
    loop {
        let mut batch = Vec::new();
        let mut owners = Vec::new();
        let mut full = None;
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.generation.finished().is_some() || params.max_new_tokens == 0 {
                continue;
            }
            let prompt: &[u32] = slot.prompt;
            let tokens: &[u32] = if slot.prefilled < prompt.len() {
                let end = (slot.prefilled + chunk).min(prompt.len());
                let part = &prompt[slot.prefilled..end];
                slot.prefilled = end;
                part
            } else {
                &slot.last
            };
            if let Err(e) = executor.blocks_mut().reserve(&mut slot.kv, tokens.len()) {
                full = Some(e);
                break;
            }
            let want_logits = slot.prefilled == slot.prompt.len();
            owners.push((i, want_logits));
            batch.push(BatchEntry {
                tokens,
                kv: &mut slot.kv,
                logits: if want_logits {
                    LogitRows::Last
                } else {
                    LogitRows::None
                },
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
        let result = executor.forward(&model.config, &model.weights, &mut batch, &mut logits);
        drop(batch);
        if let Err(e) = result {
            release_all(executor, &mut slots);
            return Err(e.into());
        }
        let mut rows = logits.chunks_exact_mut(vocab);
        for (i, _) in owners.into_iter().filter(|(_, want)| *want) {
            let Some(row) = rows.next() else { break };
            let slot = &mut slots[i];
            if slot.generation.output_ids().is_empty() {
                slot.first_logits = row.to_vec();
            }
            let event = match slot.generation.step(row, &model.tokenizer) {
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
