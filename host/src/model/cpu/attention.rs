//! Causal grouped-query attention over the paged KV cache.

use super::matmul::{axpy, dot};
use super::ops::softmax;
use super::pool::ThreadPool;
use super::shared::DisjointSlice;
use std::sync::Mutex;

/// Where one query token sits: the batch entry whose cache it reads, and its position.
#[derive(Clone, Copy)]
pub struct QueryToken {
    pub entry: usize,
    pub pos: usize,
}

/// Head layout of one attention call.
#[derive(Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Attend only to the last `window` positions (sliding-window attention), when set.
    pub window: Option<usize>,
}

/// Per-task score buffers, reused across calls.
#[derive(Default)]
pub struct AttentionScratch {
    scores: Vec<Mutex<Vec<f32>>>,
}

/// `out[t, h*d..] = softmax(q_t,h · K / sqrt(d)) · V` over positions `..=pos` of each token's
/// sequence. `q` is `[tokens, num_heads * head_dim]`; `keys` and `values` are one layer's cache.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &ThreadPool,
    heads: Heads,
    batch: &[super::BatchEntry],
    tokens: &[QueryToken],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    out: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let Heads {
        num_heads,
        num_kv_heads,
        head_dim: d,
        window,
    } = heads;
    let q_dim = num_heads * d;
    let kv_dim = num_kv_heads * d;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let n_tasks = tokens.len() * num_heads;
    let n_chunks = n_tasks.min(pool.threads() * 4).max(1);
    let longest = tokens.iter().map(|t| t.pos + 1).max().unwrap_or(0);
    if scratch.scores.len() < n_chunks {
        scratch.scores.resize_with(n_chunks, Default::default);
    }
    let out = DisjointSlice::new(out);
    let scores = &scratch.scores;
    #[cfg(target_arch = "x86_64")]
    let fast = if super::matmul::Isa::detect() == super::matmul::Isa::Avx512 {
        super::attention_avx512::Avx512Attention::new(d)
    } else {
        None
    };
    // Chunk c takes tasks c, c + n_chunks, ...: interleaving balances the causal triangle.
    pool.run(n_chunks, &|chunk| {
        let mut buf = scores[chunk].lock().unwrap_or_else(|e| e.into_inner());
        if buf.len() < longest {
            buf.resize(longest, 0.0);
        }
        for task in (chunk..n_tasks).step_by(n_chunks) {
            let (t, h) = (task / num_heads, task % num_heads);
            let token = tokens[t];
            let kv = &*batch[token.entry].kv;
            let kv_off = (h / group) * d;
            let q_head = &q[t * q_dim + h * d..][..d];
            let first = window.map_or(0, |w| (token.pos + 1).saturating_sub(w));
            #[cfg(target_arch = "x86_64")]
            if let Some(kernel) = fast {
                let head = super::attention_avx512::HeadQuery {
                    q: q_head,
                    blocks: kv.blocks(),
                    first,
                    last: token.pos,
                    kv_off,
                    kv_dim,
                    scale,
                };
                // SAFETY: task (t, h) is the only writer of this token's head h.
                let o = unsafe { out.part(t * q_dim + h * d, d) };
                kernel.attend(&head, keys, values, &mut buf[..], o);
                continue;
            }
            let span = &mut buf[..token.pos + 1 - first];
            for (s, pos) in span.iter_mut().zip(first..) {
                let slot = kv.slot(pos) * kv_dim + kv_off;
                *s = dot(q_head, &keys[slot..slot + d]) * scale;
            }
            softmax(span);
            // SAFETY: task (t, h) is the only writer of this token's head h.
            let o = unsafe { out.part(t * q_dim + h * d, d) };
            o.fill(0.0);
            for (&p, pos) in span.iter().zip(first..) {
                let slot = kv.slot(pos) * kv_dim + kv_off;
                axpy(o, p, &values[slot..slot + d]);
            }
        }
    });
}
