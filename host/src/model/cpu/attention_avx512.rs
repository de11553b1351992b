//! Attention for a group of query heads sharing a kv head, with AVX-512, for head sizes that are a multiple of 16 (up to
//! 128): the common case, and the one whose speed matters at long contexts.
//!
//! The cache stores a sequence's positions in blocks of [`BLOCK_SIZE`] consecutive slots, so
//! the kernel walks the block table and reads each block's keys and values as plain strided
//! rows. Scores of 16 positions are reduced together (one shuffle tree instead of 16
//! horizontal sums); softmax uses a vectorised `exp`; the weighted sum of values stays in
//! registers within a block and is divided by the softmax denominator once at the end. The
//! heads of a group, and in prefill several consecutive tokens of them, are handled together
//! so each block of keys and values is read from memory once, not once per head and token.
//!
//! The result equals the portable path's up to float rounding: sums are grouped differently
//! and `exp` is a polynomial accurate to about 2 ulp.

use std::arch::x86_64::*;

use super::matmul::avx512::{lanes, sums_in_order};
use super::vector_math::exp;
use crate::model::kv_cache::BLOCK_SIZE;

/// Most 16-float chunks in a head this kernel handles (head_dim 128).
const MAX_CHUNKS: usize = 8;

/// Proof that the CPU supports AVX-512 F, BW and VL.
#[derive(Clone, Copy)]
pub struct Avx512Attention(());

impl Avx512Attention {
    /// `Some` when the CPU has AVX-512 and heads of `head_dim` suit the kernel.
    pub fn new(head_dim: usize) -> Option<Self> {
        let shape_ok = head_dim.is_multiple_of(16) && head_dim > 0 && head_dim / 16 <= MAX_CHUNKS;
        let cpu_ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        (shape_ok && cpu_ok).then_some(Avx512Attention(()))
    }
}

/// Query heads that share one kv head, against positions `first..=last` of one sequence;
/// optionally for several consecutive query tokens at once (a prefill tile), so each block
/// of keys and values is read once for all of them.
pub struct HeadGroup<'a> {
    /// The queries, one after the other (`head_dim` floats each, already rotated): the heads
    /// of the tile's first token, then of the next, ...
    pub q: &'a [f32],
    /// Heads per token: `q` holds `q.len() / head_dim / heads_per_token` tokens, at positions
    /// `last - tokens + 1 ..= last`; each attends up to its own position.
    pub heads_per_token: usize,
    pub head_dim: usize,
    /// The sequence's cache blocks.
    pub blocks: &'a [u32],
    pub first: usize,
    pub last: usize,
    /// Offset of the kv head within a slot's `kv_dim` floats.
    pub kv_off: usize,
    pub kv_dim: usize,
    pub scale: f32,
}

impl HeadGroup<'_> {
    fn heads(&self) -> usize {
        self.q.len() / self.head_dim
    }

    fn span(&self) -> usize {
        self.last + 1 - self.first
    }

    /// The last position row `h` of `q` attends to.
    fn row_last(&self, h: usize) -> usize {
        let tokens = self.heads() / self.heads_per_token;
        self.last + 1 + h / self.heads_per_token - tokens
    }
}

impl Avx512Attention {
    /// `out_h = softmax(q_h · K / sqrt(d)) · V` for each head `h` of the group, `out` laid out
    /// like `q`; `scores` needs `heads * (last - first + 1)` floats.
    pub fn attend(
        self,
        group: &HeadGroup,
        keys: &[f32],
        values: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let d = group.head_dim;
        assert!(d.is_multiple_of(16) && d / 16 <= MAX_CHUNKS && group.q.len().is_multiple_of(d));
        assert!(out.len() == group.q.len() && group.heads() <= MAX_HEADS);
        let tokens = group.heads() / group.heads_per_token.max(1);
        assert!(group.heads_per_token > 0 && group.heads().is_multiple_of(group.heads_per_token));
        assert!(group.last + 1 >= tokens && group.last + 1 - tokens >= group.first);
        assert!(scores.len() >= group.heads() * group.span() && group.kv_off + d <= group.kv_dim);
        assert!(group.last / BLOCK_SIZE < group.blocks.len());
        for &b in &group.blocks[group.first / BLOCK_SIZE..=group.last / BLOCK_SIZE] {
            let end = (b as usize + 1) * BLOCK_SIZE * group.kv_dim;
            assert!(end <= keys.len() && end <= values.len());
        }
        // SAFETY: the token proves CPU support; every block the walk reads lies inside
        // `keys` and `values` (checked above), `scores` and `out` are large enough.
        unsafe { attend(group, keys, values, scores, out) }
    }
}

/// Most query rows (heads × tokens) in one group (the caller splits larger groups).
pub const MAX_HEADS: usize = 8;

/// Positions `first..=last` grouped by cache block: (first position, count, first slot).
fn block_runs<'a>(g: &'a HeadGroup<'a>) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let mut pos = g.first;
    std::iter::from_fn(move || {
        if pos > g.last {
            return None;
        }
        let in_block = pos % BLOCK_SIZE;
        let n = (BLOCK_SIZE - in_block).min(g.last + 1 - pos);
        let slot = g.blocks[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + in_block;
        let run = (pos, n, slot);
        pos += n;
        Some(run)
    })
}

/// # Safety
/// AVX-512 F/BW/VL available; the bounds [`Avx512Attention::attend`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn attend(g: &HeadGroup, keys: &[f32], values: &[f32], scores: &mut [f32], out: &mut [f32]) {
    // The chunk count as a constant lets the compiler unroll the loops over a head and keep
    // every accumulator in a register; with a run-time count they lived on the stack, and
    // each multiply-add waited for the previous one's store (half the speed).
    // SAFETY (each arm): forwarded from this function's contract.
    unsafe {
        match g.head_dim / 16 {
            1 => attend_chunks::<1>(g, keys, values, scores, out),
            2 => attend_chunks::<2>(g, keys, values, scores, out),
            3 => attend_chunks::<3>(g, keys, values, scores, out),
            4 => attend_chunks::<4>(g, keys, values, scores, out),
            5 => attend_chunks::<5>(g, keys, values, scores, out),
            6 => attend_chunks::<6>(g, keys, values, scores, out),
            7 => attend_chunks::<7>(g, keys, values, scores, out),
            _ => attend_chunks::<MAX_CHUNKS>(g, keys, values, scores, out),
        }
    }
}

/// [`attend`] for heads of `C` 16-float chunks.
///
/// # Safety
/// As [`attend`], and `g.head_dim == 16 * C`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn attend_chunks<const C: usize>(
    g: &HeadGroup,
    keys: &[f32],
    values: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = C * 16;
    let (heads, span) = (g.heads(), g.span());
    let scale = _mm512_set1_ps(g.scale);
    let (kp, vp) = (keys.as_ptr(), values.as_ptr());
    // One past the last position each row attends to (computed once: it takes divisions).
    let mut row_end = [0usize; MAX_HEADS];
    for (h, end) in row_end.iter_mut().enumerate().take(heads) {
        *end = g.row_last(h) + 1;
    }
    // How many of the `n` positions from `pos` on row `h` sees.
    let row_count = |h: usize, pos: usize, n: usize| row_end[h].saturating_sub(pos).min(n);

    // Scores, 16 positions per reduction (a block run has at most 16). Each block's keys are
    // read from memory once and then from L1 for the group's other rows. Every row computes
    // all 16 lanes, so the loop has no run-time bound: lanes past the row's count repeat
    // its last position and are masked off.
    let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); MAX_HEADS];
    for (pos, n, slot) in block_runs(g) {
        // SAFETY: slot is inside the block, which lies inside `keys`.
        let rows = unsafe { kp.add(slot * g.kv_dim + g.kv_off) };
        for (h, max) in max.iter_mut().enumerate().take(heads) {
            // Rows of later tokens in a tile see more positions than earlier ones.
            let n = row_count(h, pos, n);
            if n == 0 {
                continue;
            }
            let mut q = [_mm512_setzero_ps(); C];
            for (c, q) in q.iter_mut().enumerate() {
                // SAFETY: (h * C + c) * 16 + 16 <= q.len().
                *q = unsafe { _mm512_loadu_ps(g.q.as_ptr().add(h * d + c * 16)) };
            }
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, v) in v.iter_mut().enumerate() {
                // SAFETY: position i.min(n - 1) of the run is inside its block.
                let row = unsafe { rows.add(i.min(n - 1) * g.kv_dim) };
                // Two partial sums, so the multiply-adds of one position form two short
                // dependency chains rather than one long one.
                let mut acc = [_mm512_setzero_ps(); 2];
                for (c, q) in q.iter().enumerate() {
                    // SAFETY: as above; c * 16 + 16 <= head_dim.
                    let k = unsafe { _mm512_loadu_ps(row.add(c * 16)) };
                    acc[c % 2] = _mm512_fmadd_ps(*q, k, acc[c % 2]);
                }
                *v = _mm512_add_ps(acc[0], acc[1]);
            }
            let mask = lanes(n);
            let s = _mm512_mul_ps(sums_in_order(&v), scale);
            *max = _mm512_mask_max_ps(*max, mask, *max, s);
            let at = h * span + pos - g.first;
            // SAFETY: at + n <= heads * span.
            unsafe { _mm512_mask_storeu_ps(scores.as_mut_ptr().add(at), mask, s) };
        }
    }
    let mut max_all = [_mm512_setzero_ps(); MAX_HEADS];
    for (m, max) in max_all.iter_mut().zip(&max).take(heads) {
        *m = _mm512_set1_ps(_mm512_reduce_max_ps(*max));
    }

    // exp(s - max), their sums, and the unnormalised weighted sums of values, kept in `out`
    // between blocks (each block's values come from memory once for all rows).
    out.fill(0.0);
    let mut sum = [_mm512_setzero_ps(); MAX_HEADS];
    for (pos, n, slot) in block_runs(g) {
        // SAFETY: slot is inside the block, which lies inside `values`.
        let rows = unsafe { vp.add(slot * g.kv_dim + g.kv_off) };
        for h in 0..heads {
            let n = row_count(h, pos, n);
            if n == 0 {
                continue;
            }
            let mask = lanes(n);
            let at = h * span + pos - g.first;
            // SAFETY: at + n <= heads * span.
            let s = unsafe { _mm512_maskz_loadu_ps(mask, scores.as_ptr().add(at)) };
            let e = _mm512_maskz_mov_ps(mask, exp(_mm512_sub_ps(s, max_all[h])));
            sum[h] = _mm512_add_ps(sum[h], e);
            let mut weights = [0.0f32; 16];
            // SAFETY: `weights` holds 16 floats.
            unsafe { _mm512_storeu_ps(weights.as_mut_ptr(), e) };
            // SAFETY: head h's output has d floats.
            let o = unsafe { out.as_mut_ptr().add(h * d) };
            // Even and odd positions accumulate apart (two independent chains per chunk),
            // then meet in `out`. All 16 lanes again: past the row's count the weight is 0
            // and the row repeated is a real (finite) one.
            let mut even = [_mm512_setzero_ps(); C];
            let mut odd = [_mm512_setzero_ps(); C];
            for (c, even) in even.iter_mut().enumerate() {
                // SAFETY: head h's output has C * 16 floats.
                *even = unsafe { _mm512_loadu_ps(o.add(c * 16)) };
            }
            for i in (0..16).step_by(2) {
                let (w0, w1) = (_mm512_set1_ps(weights[i]), _mm512_set1_ps(weights[i + 1]));
                // SAFETY: positions i.min(n - 1) and (i + 1).min(n - 1) are in the block.
                let (r0, r1) = unsafe {
                    (
                        rows.add(i.min(n - 1) * g.kv_dim),
                        rows.add((i + 1).min(n - 1) * g.kv_dim),
                    )
                };
                for c in 0..C {
                    // SAFETY: c * 16 + 16 <= head_dim.
                    let (v0, v1) = unsafe {
                        (
                            _mm512_loadu_ps(r0.add(c * 16)),
                            _mm512_loadu_ps(r1.add(c * 16)),
                        )
                    };
                    even[c] = _mm512_fmadd_ps(w0, v0, even[c]);
                    odd[c] = _mm512_fmadd_ps(w1, v1, odd[c]);
                }
            }
            for (c, (even, odd)) in even.iter().zip(&odd).enumerate() {
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(o.add(c * 16), _mm512_add_ps(*even, *odd)) };
            }
        }
    }
    for (h, sum) in sum.iter().enumerate().take(heads) {
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(*sum));
        // SAFETY: head h's output has d floats.
        let o = unsafe { out.as_mut_ptr().add(h * d) };
        for c in 0..C {
            // SAFETY: as above.
            unsafe {
                _mm512_storeu_ps(
                    o.add(c * 16),
                    _mm512_mul_ps(_mm512_loadu_ps(o.add(c * 16)), inv),
                )
            };
        }
    }
}
