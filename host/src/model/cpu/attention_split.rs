//! The decode step's attention (one query position per sequence), split by context position.
//!
//! A task is one sequence's token, all of its heads, over one part of its context; the AVX-512
//! kernel walks that part block by block, every kv head of a block in turn, so the cache is
//! read in contiguous runs. A batch of one token still gives every thread work: its context is
//! cut into parts whose partial softmax sums are combined afterwards (flash-decoding). Splitting
//! by head instead left a model with 3 kv heads (SmolLM2) with one thread doing two thirds of
//! the work, and read the cache strided; both together held decode attention to ~11 GB/s on two
//! cores where plain reads reach 30+.

use std::sync::Mutex;

use super::attention::{Heads, QueryToken};
use super::attention_avx512::{Avx512Attention, PartSums, TokenPart};
use super::kv_element::KvElement;
use super::pool::ThreadPool;
use super::shared::DisjointSlice;
use crate::model::executor::BatchEntry;

/// Parts per thread the work is cut into (when there are fewer tokens than that), so a thread
/// that starts late does not hold up the step with a whole half.
const PARTS_PER_THREAD: usize = 2;

/// Fewest context positions worth a part of their own: below this, combining parts costs more
/// than the parallelism gains.
const MIN_PART_POSITIONS: usize = 64;

/// Most context positions in one part: bounds each task's scores buffer (`num_heads` times
/// this) however long the context, and keeps one long sequence from becoming a single task
/// that the other threads wait for.
const MAX_PART_POSITIONS: usize = 2048;

/// One task: a token's positions `first..=last`; `split` when its token has other parts too
/// (its sums then go to the partials and are combined after the run).
#[derive(Clone, Copy)]
struct Part {
    token: usize,
    first: usize,
    last: usize,
    split: bool,
}

/// Buffers reused across calls (so a decode step allocates nothing once they have grown).
#[derive(Default)]
pub struct SplitScratch {
    parts: Vec<Part>,
    /// Per part: `num_heads * head_dim` weighted value sums, then `num_heads` maxima, then
    /// `num_heads` exponential sums.
    partials: Vec<f32>,
    /// Scores of the part each chunk of tasks is working on.
    scores: Vec<Mutex<Vec<f32>>>,
}

/// [`super::attention::attention`] for the tokens `selected` picks, each on its own; the
/// others' outputs are left as they are. Any token gets the right result; the caller picks
/// decode tokens, which share no sequence with another token of the call, so nothing is lost
/// by not sharing block reads between them.
#[allow(clippy::too_many_arguments)]
pub fn attention<E: KvElement>(
    kernel: Avx512Attention,
    pool: &ThreadPool,
    heads: Heads,
    batch: &[BatchEntry],
    (tokens, selected): (&[QueryToken], &dyn Fn(usize) -> bool),
    q: &[f32],
    keys: &[E],
    values: &[E],
    out: &mut [f32],
    scratch: &mut SplitScratch,
) {
    let Heads {
        num_heads: nh,
        num_kv_heads,
        head_dim: d,
        window,
    } = heads;
    let q_dim = nh * d;
    let first_of = |t: &QueryToken| window.map_or(0, |w| (t.pos + 1).saturating_sub(w));
    let target = pool.threads() * PARTS_PER_THREAD;
    let count = (0..tokens.len()).filter(|&i| selected(i)).count();
    if count == 0 {
        return;
    }
    let per_token = target.div_ceil(count);
    let parts = &mut scratch.parts;
    parts.clear();
    for (i, t) in tokens.iter().enumerate().filter(|&(i, _)| selected(i)) {
        let first = first_of(t);
        let span = t.pos + 1 - first;
        let n = per_token
            .min(span.div_ceil(MIN_PART_POSITIONS))
            .max(span.div_ceil(MAX_PART_POSITIONS))
            .max(1);
        let len = span.div_ceil(n);
        let mut p0 = first;
        while p0 <= t.pos {
            let last = (p0 + len - 1).min(t.pos);
            parts.push(Part {
                token: i,
                first: p0,
                last,
                split: n > 1,
            });
            p0 = last + 1;
        }
    }
    let parts = &scratch.parts;
    let stride = nh * (d + 2);
    let partials = &mut scratch.partials;
    if partials.len() < parts.len() * stride {
        partials.resize(parts.len() * stride, 0.0);
    }
    let n_chunks = parts.len().min(pool.threads() * 4).max(1);
    if scratch.scores.len() < n_chunks {
        scratch.scores.resize_with(n_chunks, Default::default);
    }
    let longest = parts
        .iter()
        .map(|p| p.last + 1 - p.first)
        .max()
        .unwrap_or(0);
    let scale = 1.0 / (d as f32).sqrt();
    let out_parts = DisjointSlice::new(&mut *out);
    let partial_parts = DisjointSlice::new(&mut partials[..]);
    let scores = &scratch.scores;
    // Chunk c takes parts c, c + n_chunks, ...
    pool.run(n_chunks, &|chunk| {
        let mut buf = scores[chunk].lock().unwrap_or_else(|e| e.into_inner());
        if buf.len() < nh * longest {
            buf.resize(nh * longest, 0.0);
        }
        for (i, part) in parts.iter().enumerate().skip(chunk).step_by(n_chunks) {
            let token = tokens[part.token];
            let task = TokenPart {
                q: &q[part.token * q_dim..][..q_dim],
                num_heads: nh,
                num_kv_heads,
                head_dim: d,
                blocks: batch[token.entry].kv.blocks(),
                first: part.first,
                last: part.last,
                scale,
            };
            // SAFETY: part i alone writes partial slot i.
            let slot = unsafe { partial_parts.part(i * stride, stride) };
            let (acc, stats) = slot.split_at_mut(q_dim);
            let (max, sum) = stats.split_at_mut(nh);
            let mut sums = PartSums { out: acc, max, sum };
            kernel.attend_part(&task, keys, values, &mut buf[..], &mut sums);
            if !part.split {
                // SAFETY: an unsplit token has this one part, the only writer of its output.
                let o = unsafe { out_parts.part(part.token * q_dim, q_dim) };
                for ((o, a), &s) in o.chunks_exact_mut(d).zip(acc.chunks_exact(d)).zip(&*sum) {
                    let inv = 1.0 / s;
                    for (o, &a) in o.iter_mut().zip(a) {
                        *o = a * inv;
                    }
                }
            }
        }
    });
    combine(parts, &scratch.partials, nh, d, out);
}

/// Each split token's output from its parts' sums: every part's share rescaled to the
/// overall maximum, added, and divided by the rescaled total of the exponentials.
fn combine(parts: &[Part], partials: &[f32], nh: usize, d: usize, out: &mut [f32]) {
    let stride = nh * (d + 2);
    let mut i = 0;
    while i < parts.len() {
        let token = parts[i].token;
        let n = parts[i..].iter().take_while(|p| p.token == token).count();
        if parts[i].split {
            let slots = &partials[i * stride..(i + n) * stride];
            let o = &mut out[token * nh * d..][..nh * d];
            for h in 0..nh {
                let stat = |p: usize, k: usize| slots[p * stride + nh * d + k * nh + h];
                let max = (0..n).map(|p| stat(p, 0)).fold(f32::NEG_INFINITY, f32::max);
                let o = &mut o[h * d..][..d];
                o.fill(0.0);
                let mut total = 0.0;
                for p in 0..n {
                    let w = (stat(p, 0) - max).exp();
                    total += w * stat(p, 1);
                    let acc = &slots[p * stride + h * d..][..d];
                    for (o, &a) in o.iter_mut().zip(acc) {
                        *o += w * a;
                    }
                }
                let inv = 1.0 / total;
                o.iter_mut().for_each(|o| *o *= inv);
            }
        }
        i += n;
    }
}
