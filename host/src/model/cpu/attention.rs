//! Causal grouped-query attention over the paged KV cache.

use super::kv_element::KvElement;
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

/// Per-task buffers and the token tiles, reused across calls.
#[derive(Default)]
pub struct AttentionScratch {
    tasks: Vec<Mutex<TaskScratch>>,
    /// `(first token, count)` of each tile of consecutive query tokens.
    tiles: Vec<(usize, usize)>,
    #[cfg(target_arch = "x86_64")]
    split: super::attention_split::SplitScratch,
}

/// One task's scores, and the portable path's key or value row converted to f32.
#[derive(Default)]
struct TaskScratch {
    scores: Vec<f32>,
    row: Vec<f32>,
}

/// `out[t, h*d..] = softmax(q_t,h · K / sqrt(d)) · V` over positions `..=pos` of each token's
/// sequence. `q` is `[tokens, num_heads * head_dim]`; `keys` and `values` are one layer's cache,
/// stored as `E`.
#[allow(clippy::too_many_arguments)]
pub fn attention<E: KvElement>(
    pool: &ThreadPool,
    heads: Heads,
    batch: &[crate::model::executor::BatchEntry],
    tokens: &[QueryToken],
    q: &[f32],
    keys: &[E],
    values: &[E],
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
    // A task is one token's run of up to MAX_GROUP query heads that share a kv head: the
    // fast kernel then reads that kv head's keys and values once for all of them.
    let runs_per_group = group.div_ceil(MAX_GROUP);
    let run_len = group.div_ceil(runs_per_group);
    let runs = num_kv_heads * runs_per_group;
    // Consecutive positions of one sequence (a prefill chunk) go in tiles of up to
    // MAX_GROUP / run_len tokens, which the fast kernel handles at once, reading each block of
    // keys and values once per tile instead of once per token. A sliding window gives each
    // token a different first position, so there every tile is one token.
    #[cfg(target_arch = "x86_64")]
    let fast = if super::matmul::Isa::detect() == super::matmul::Isa::Avx512 {
        super::attention_avx512::Avx512Attention::new(d)
    } else {
        None
    };
    // A token that is its sequence's only query in this call: a decode token.
    let alone = |t: usize| {
        let e = tokens[t].entry;
        (t == 0 || tokens[t - 1].entry != e)
            && !matches!(tokens.get(t + 1), Some(next) if next.entry == e)
    };
    // Decode tokens go split by context position, reading the cache in contiguous runs; the
    // tiles below then take only the prefill chunks of the same step.
    #[cfg(target_arch = "x86_64")]
    let split = fast.is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let split = false;
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = fast {
        super::attention_split::attention(
            kernel,
            pool,
            heads,
            batch,
            (tokens, &alone),
            q,
            keys,
            values,
            out,
            &mut scratch.split,
        );
        if (0..tokens.len()).all(alone) {
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    let tile_max = if fast.is_some() && window.is_none() {
        (super::attention_avx512::MAX_HEADS / run_len).max(1)
    } else {
        1
    };
    #[cfg(not(target_arch = "x86_64"))]
    let tile_max = 1;
    let tiles = &mut scratch.tiles;
    tiles.clear();
    for (t, token) in tokens.iter().enumerate() {
        if split && alone(t) {
            continue;
        }
        match tiles.last_mut() {
            Some((start, count))
                if *count < tile_max
                    && tokens[*start + *count - 1].entry == token.entry
                    && tokens[*start + *count - 1].pos + 1 == token.pos =>
            {
                *count += 1
            }
            _ => tiles.push((t, 1)),
        }
    }
    let tiles = &scratch.tiles;
    let n_tasks = tiles.len() * runs;
    let n_chunks = n_tasks.min(pool.threads() * 4).max(1);
    let longest = tokens.iter().map(|t| t.pos + 1).max().unwrap_or(0);
    if scratch.tasks.len() < n_chunks {
        scratch.tasks.resize_with(n_chunks, Default::default);
    }
    let out = DisjointSlice::new(out);
    let task_scratch = &scratch.tasks;
    // Chunk c takes tasks c, c + n_chunks, ...: interleaving balances the causal triangle.
    pool.run(n_chunks, &|chunk| {
        let mut guard = task_scratch[chunk]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let TaskScratch { scores: buf, row } = &mut *guard;
        if buf.len() < longest * run_len * tile_max {
            buf.resize(longest * run_len * tile_max, 0.0);
        }
        if row.len() < d {
            row.resize(d, 0.0);
        }
        for task in (chunk..n_tasks).step_by(n_chunks) {
            // Tiles vary fastest: a chunk's consecutive tasks then use the same kv head,
            // whose keys and values stay in L2 between them.
            let (tile, run) = (task % tiles.len(), task / tiles.len());
            let (kv_head, part) = (run / runs_per_group, run % runs_per_group);
            let h0 = kv_head * group + part * run_len;
            let n_heads = run_len.min((kv_head + 1) * group - h0);
            let kv_off = kv_head * d;
            let (t0, count) = tiles[tile];
            #[cfg(target_arch = "x86_64")]
            if let Some(kernel) = fast {
                // The tile's queries side by side, and its outputs, in stack buffers.
                let rows = count * n_heads * d;
                let mut q_tile = [0.0f32; TILE_FLOATS];
                let mut o_tile = [0.0f32; TILE_FLOATS];
                for i in 0..count {
                    let src = &q[(t0 + i) * q_dim + h0 * d..][..n_heads * d];
                    q_tile[i * n_heads * d..][..n_heads * d].copy_from_slice(src);
                }
                let last = tokens[t0 + count - 1];
                let heads = super::attention_avx512::HeadGroup {
                    q: &q_tile[..rows],
                    heads_per_token: n_heads,
                    head_dim: d,
                    blocks: batch[last.entry].kv.blocks(),
                    first: window.map_or(0, |w| (last.pos + 1).saturating_sub(w)),
                    last: last.pos,
                    kv_off,
                    kv_dim,
                    scale,
                };
                kernel.attend(&heads, keys, values, &mut buf[..], &mut o_tile[..rows]);
                for i in 0..count {
                    // SAFETY: this task is the only writer of heads h0..h0 + n_heads of the
                    // tile's tokens.
                    let o = unsafe { out.part((t0 + i) * q_dim + h0 * d, n_heads * d) };
                    o.copy_from_slice(&o_tile[i * n_heads * d..][..n_heads * d]);
                }
                continue;
            }
            for t in t0..t0 + count {
                let token = tokens[t];
                let kv = &*batch[token.entry].kv;
                let q_run = &q[t * q_dim + h0 * d..][..n_heads * d];
                let first = window.map_or(0, |w| (token.pos + 1).saturating_sub(w));
                // SAFETY: this task is the only writer of heads h0..h0 + n_heads of token t.
                let o = unsafe { out.part(t * q_dim + h0 * d, n_heads * d) };
                for (q_head, o) in q_run.chunks_exact(d).zip(o.chunks_exact_mut(d)) {
                    let span = &mut buf[..token.pos + 1 - first];
                    for (s, pos) in span.iter_mut().zip(first..) {
                        let slot = kv.slot(pos) * kv_dim + kv_off;
                        *s = dot(q_head, E::row_f32(&keys[slot..slot + d], row)) * scale;
                    }
                    softmax(span);
                    o.fill(0.0);
                    for (&p, pos) in span.iter().zip(first..) {
                        let slot = kv.slot(pos) * kv_dim + kv_off;
                        axpy(o, p, E::row_f32(&values[slot..slot + d], row));
                    }
                }
            }
        }
    });
}

/// Floats in a tile's query (and output) stack buffer: MAX_HEADS rows of head_dim <= 128.
#[cfg(target_arch = "x86_64")]
const TILE_FLOATS: usize = super::attention_avx512::MAX_HEADS * 128;

/// Most query heads one attention task handles together.
const MAX_GROUP: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::executor::{BatchEntry, LogitRows};
    use crate::model::kv_cache::{KvCache, KvDtype, KvLayout, LayerKv, SequenceKv};

    /// Values in [-1, 1) from a fixed xorshift sequence.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Queries of a 37-token sequence (three cache blocks, the last partial, with the block
    /// table out of order) against an f64 reference, for head sizes the AVX-512 kernel takes
    /// (128, 64, 48, 32, 16) and one it leaves to the portable path (8), with and without a
    /// sliding window, with query-head groups of 2 and of 10.
    #[test]
    fn matches_reference() {
        let shapes = [
            (64, None, 4, 2),
            (64, Some(5), 4, 2),
            (8, None, 4, 2),
            (8, Some(20), 4, 2),
            // A group larger than one task takes (MAX_GROUP): split in two runs of 5.
            (32, None, 10, 1),
            // One head per kv head: prefill tiles of 8 tokens.
            (64, None, 4, 4),
            // Groups of 3: tiles of 2 tokens.
            (16, None, 6, 2),
            // The largest head the AVX-512 kernel takes, and an odd chunk count with a
            // window that starts mid-block.
            (128, None, 2, 1),
            (48, Some(9), 3, 3),
        ];
        for dtype in [KvDtype::F32, KvDtype::F16] {
            for shape in shapes {
                check_shape(shape, dtype);
            }
        }
    }

    /// Decode steps (attention split by context position, long contexts cut into parts whose
    /// sums are combined) against the f64 reference: batches of several sequences of different
    /// lengths, one sequence alone (cut into a part per task), and decode tokens beside another
    /// sequence's prefill chunk in the same call; f32 and f16 caches, with and
    /// without a sliding window, one, three and ten query heads per kv head, head sizes of an
    /// even and an odd number of 16-float chunks.
    #[test]
    fn decode_step_matches_reference() {
        let shapes = [
            (64, None, 4, 4),
            (64, None, 9, 3),
            (32, Some(100), 10, 1),
            (16, None, 6, 2),
            (128, Some(7), 2, 1),
            (48, Some(9), 3, 3),
        ];
        // Parts that end mid-block and on a block boundary (256 in 4 parts of 64), and more
        // sequences than two parts per thread, one longer than a part may be (2100 > 2048).
        let batches: [&[usize]; 5] = [
            &[37, 300, 5],
            &[300],
            &[256],
            &[257],
            &[20, 3, 70, 2100, 40],
        ];
        for dtype in [KvDtype::F32, KvDtype::F16] {
            for shape in shapes {
                for lens in batches {
                    check_decode(shape, dtype, lens, 1);
                    // The first sequence's last 5 positions as a prefill chunk beside the
                    // others' decode tokens: both paths in one call.
                    if lens.len() > 1 {
                        check_decode(shape, dtype, lens, 5);
                    }
                }
            }
        }
    }

    /// Head size, sliding window, query heads, kv heads.
    type Shape = (usize, Option<usize>, usize, usize);

    fn heads_of((head_dim, window, num_heads, num_kv_heads): Shape) -> Heads {
        Heads {
            num_heads,
            num_kv_heads,
            head_dim,
            window,
        }
    }

    /// Each sequence of `lens` queries its last position, except the first, which queries its
    /// last `chunk` positions (a prefill chunk in the same call when `chunk > 1`).
    fn check_decode(shape: Shape, dtype: KvDtype, lens: &[usize], chunk: usize) {
        let (d, window, num_heads, num_kv_heads) = shape;
        let heads = heads_of(shape);
        let (kv_dim, q_dim) = (num_kv_heads * d, num_heads * d);
        let blocks: usize = lens.iter().map(|&l| l.div_ceil(16)).sum();
        let mut cache = KvCache::new(
            KvLayout {
                num_layers: 1,
                kv_dim,
                dtype,
            },
            blocks + 1,
        );
        // Interleaved reservations: each sequence's blocks are scattered through the cache.
        let mut seqs: Vec<SequenceKv> = lens.iter().map(|_| SequenceKv::new()).collect();
        for step in (16..).step_by(16) {
            let mut grew = false;
            for (seq, &len) in seqs.iter_mut().zip(lens) {
                if seq.blocks().len() * 16 < len {
                    cache.pool_mut().reserve(seq, step.min(len)).expect("room");
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
        let k_all: Vec<Vec<f32>> = (0..lens.len())
            .map(|i| values(10 + i as u64, lens[i] * kv_dim))
            .collect();
        let v_all: Vec<Vec<f32>> = (0..lens.len())
            .map(|i| values(20 + i as u64, lens[i] * kv_dim))
            .collect();
        let (k_all, v_all): (Vec<Vec<f32>>, Vec<Vec<f32>>) = match dtype {
            KvDtype::F32 => (k_all, v_all),
            KvDtype::F16 => (
                k_all.iter().map(|k| through_f16(k)).collect(),
                v_all.iter().map(|v| through_f16(v)).collect(),
            ),
        };
        let tokens: Vec<QueryToken> = lens
            .iter()
            .enumerate()
            .flat_map(|(entry, &len)| {
                let first = if entry == 0 { len - chunk } else { len - 1 };
                (first..len).map(move |pos| QueryToken { entry, pos })
            })
            .collect();
        let q = values(3, tokens.len() * q_dim);
        // Every sequence's slots, keys and values end to end, stored in one go.
        let slots: Vec<usize> = seqs
            .iter()
            .zip(lens)
            .flat_map(|(seq, &len)| (0..len).map(|pos| seq.slot(pos)))
            .collect();
        let (k_flat, v_flat) = (k_all.concat(), v_all.concat());
        let dummy = [0u32];
        let batch: Vec<BatchEntry> = seqs
            .iter_mut()
            .map(|kv| BatchEntry {
                tokens: &dummy,
                kv,
                logits: LogitRows::None,
            })
            .collect();
        let mut out = vec![f32::NAN; tokens.len() * q_dim];
        let new = (&k_flat[..], &v_flat[..]);
        match cache.layer_mut(0) {
            LayerKv::F32 { keys, values } => fill_and_attend(
                keys, values, &slots, new, heads, &batch, &tokens, &q, &mut out,
            ),
            LayerKv::F16 { keys, values } => fill_and_attend(
                keys, values, &slots, new, heads, &batch, &tokens, &q, &mut out,
            ),
        }
        for (t, token) in tokens.iter().enumerate() {
            let first = window.map_or(0, |w| (token.pos + 1).saturating_sub(w));
            let want = reference(
                &q[t * q_dim..][..q_dim],
                (&k_all[token.entry], &v_all[token.entry]),
                heads,
                first..=token.pos,
            );
            for (i, (&got, want)) in out[t * q_dim..][..q_dim].iter().zip(want).enumerate() {
                assert!(
                    (got as f64 - want).abs() <= 1e-5,
                    "{dtype:?} d={d} window={window:?} heads={num_heads}/{num_kv_heads} \
                     lens={lens:?} chunk={chunk} token={t} element {i}: {got} vs {want}"
                );
            }
        }
    }

    /// Every head's attention output for one query (`num_heads * head_dim` floats) over
    /// `positions` of one sequence's keys and values (`[position, kv_dim]`), in f64.
    fn reference(
        q: &[f32],
        (k_all, v_all): (&[f32], &[f32]),
        heads: Heads,
        positions: std::ops::RangeInclusive<usize>,
    ) -> Vec<f64> {
        let d = heads.head_dim;
        let kv_dim = heads.num_kv_heads * d;
        let group = heads.num_heads / heads.num_kv_heads;
        let mut out = Vec::with_capacity(heads.num_heads * d);
        for h in 0..heads.num_heads {
            let kv_off = (h / group) * d;
            let qh = &q[h * d..][..d];
            let scores: Vec<f64> = positions
                .clone()
                .map(|p| {
                    let k = &k_all[p * kv_dim + kv_off..][..d];
                    let dot: f64 = qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    dot / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for i in 0..d {
                let sum: f64 = positions
                    .clone()
                    .zip(&weights)
                    .map(|(p, w)| w * v_all[p * kv_dim + kv_off + i] as f64)
                    .sum();
                out.push(sum / total);
            }
        }
        out
    }

    /// Stores `k_all`/`v_all` (positions in order) in the cache's slots and attends.
    #[allow(clippy::too_many_arguments)]
    fn fill_and_attend<E: KvElement>(
        keys: &mut [E],
        vals: &mut [E],
        slots: &[usize],
        (k_all, v_all): (&[f32], &[f32]),
        heads: Heads,
        batch: &[BatchEntry],
        tokens: &[QueryToken],
        q: &[f32],
        out: &mut [f32],
    ) {
        let kv_dim = heads.num_kv_heads * heads.head_dim;
        for (pos, &slot) in slots.iter().enumerate() {
            let at = slot * kv_dim;
            E::store(&mut keys[at..at + kv_dim], &k_all[pos * kv_dim..][..kv_dim]);
            E::store(&mut vals[at..at + kv_dim], &v_all[pos * kv_dim..][..kv_dim]);
        }
        let pool = ThreadPool::new(2);
        let mut scratch = AttentionScratch::default();
        attention(
            &pool,
            heads,
            batch,
            tokens,
            q,
            keys,
            vals,
            out,
            &mut scratch,
        );
    }

    /// The value f16 storage keeps of each of `v`.
    fn through_f16(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
    }

    fn check_shape(shape: Shape, dtype: KvDtype) {
        let (d, window, num_heads, num_kv_heads) = shape;
        let heads = heads_of(shape);
        let (kv_dim, q_dim) = (num_kv_heads * d, num_heads * d);
        let len = 37;
        let mut cache = KvCache::new(
            KvLayout {
                num_layers: 1,
                kv_dim,
                dtype,
            },
            6,
        );
        // Take a block first so the sequence's blocks are not 0, 1, 2.
        let mut other = SequenceKv::new();
        cache.pool_mut().reserve(&mut other, 16).expect("room");
        let mut seq = SequenceKv::new();
        cache.pool_mut().reserve(&mut seq, len).expect("room");
        let slots: Vec<usize> = (0..len).map(|pos| seq.slot(pos)).collect();
        let (k_all, v_all) = (values(1, len * kv_dim), values(2, len * kv_dim));
        // The reference attends over what the cache holds.
        let (k_all, v_all) = match dtype {
            KvDtype::F32 => (k_all, v_all),
            KvDtype::F16 => (through_f16(&k_all), through_f16(&v_all)),
        };
        // Scattered positions (runs of 2 and 3 tile together), then a whole prompt as a
        // prefill chunk gives them (tiles of up to 8 consecutive tokens, one partial).
        let scattered = [0, 1, 15, 16, 17, 31, 36];
        let whole: Vec<usize> = (0..len).collect();
        for positions in [&scattered[..], &whole[..]] {
            let q = values(3, positions.len() * q_dim);
            let tokens: Vec<QueryToken> = positions
                .iter()
                .map(|&pos| QueryToken { entry: 0, pos })
                .collect();
            let dummy = [0u32];
            let batch = [BatchEntry {
                tokens: &dummy,
                kv: &mut seq,
                logits: LogitRows::None,
            }];
            let mut out = vec![f32::NAN; positions.len() * q_dim];
            let new = (&k_all[..], &v_all[..]);
            match cache.layer_mut(0) {
                LayerKv::F32 { keys, values } => fill_and_attend(
                    keys, values, &slots, new, heads, &batch, &tokens, &q, &mut out,
                ),
                LayerKv::F16 { keys, values } => fill_and_attend(
                    keys, values, &slots, new, heads, &batch, &tokens, &q, &mut out,
                ),
            }
            for (t, &pos) in positions.iter().enumerate() {
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let want = reference(
                    &q[t * q_dim..][..q_dim],
                    (&k_all, &v_all),
                    heads,
                    first..=pos,
                );
                for (i, (&got, want)) in out[t * q_dim..][..q_dim].iter().zip(want).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5,
                        "{dtype:?} d={d} window={window:?} pos={pos} element {i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
