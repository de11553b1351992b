//! Attention for a group of query heads sharing a kv head, with AVX-512, for head sizes that
//! are a multiple of 16 (up to 128): the common case, and the one whose speed matters at long
//! contexts.
//!
//! The cache stores a sequence's positions in blocks of [`BLOCK_SIZE`] consecutive slots, so
//! the kernel walks the block table and reads each block's keys and values as plain strided
//! rows, f32 or f16 (widened to f32 as they are loaded; all arithmetic is f32). Scores of 16 positions are reduced together (one shuffle tree instead of 16
//! horizontal sums); softmax uses a vectorised `exp`; the weighted sum of values stays in
//! registers within a block and is divided by the softmax denominator once at the end. The
//! heads of a group, and in prefill several consecutive tokens of them, are handled together
//! so each block of keys and values is read from memory once, not once per head and token.
//!
//! The result equals the portable path's up to float rounding: sums are grouped differently
//! and `exp` is a polynomial accurate to about 2 ulp.

use std::arch::x86_64::*;

use super::kv_element::KvElement;
use super::matmul::avx512::{lanes, sums_in_order, Widen, F32};
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
    pub fn attend<E: KvElement>(
        self,
        group: &HeadGroup,
        keys: &[E],
        values: &[E],
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
        unsafe { attend::<E::Wide>(group, keys, values, scores, out) }
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
unsafe fn attend<W: Widen>(
    g: &HeadGroup,
    keys: &[W::Elem],
    values: &[W::Elem],
    scores: &mut [f32],
    out: &mut [f32],
) {
    // The chunk count as a constant lets the compiler unroll the loops over a head and keep
    // every accumulator in a register; with a run-time count they lived on the stack, and
    // each multiply-add waited for the previous one's store (half the speed).
    // SAFETY (each arm): forwarded from this function's contract.
    unsafe {
        match g.head_dim / 16 {
            1 => attend_chunks::<W, 1>(g, keys, values, scores, out),
            2 => attend_chunks::<W, 2>(g, keys, values, scores, out),
            3 => attend_chunks::<W, 3>(g, keys, values, scores, out),
            4 => attend_chunks::<W, 4>(g, keys, values, scores, out),
            5 => attend_chunks::<W, 5>(g, keys, values, scores, out),
            6 => attend_chunks::<W, 6>(g, keys, values, scores, out),
            7 => attend_chunks::<W, 7>(g, keys, values, scores, out),
            _ => attend_chunks::<W, MAX_CHUNKS>(g, keys, values, scores, out),
        }
    }
}

/// What every block step of one [`attend_chunks`] call shares.
struct Rows<'a> {
    g: &'a HeadGroup<'a>,
    heads: usize,
    span: usize,
    /// One past the last position each row attends to (computed once: it takes divisions).
    end: [usize; MAX_HEADS],
}

impl<'a> Rows<'a> {
    /// The rows of a one-token group, each attending to all of `g`'s positions.
    fn whole(g: &'a HeadGroup<'a>) -> Self {
        Rows {
            g,
            heads: g.heads(),
            span: g.span(),
            end: [g.last + 1; MAX_HEADS],
        }
    }

    /// How many of the `n` positions from `pos` on row `h` sees (rows of later tokens in a
    /// tile see more than earlier ones).
    fn count(&self, h: usize, pos: usize, n: usize) -> usize {
        self.end[h].saturating_sub(pos).min(n)
    }
}

/// A block's rows widened to f32, `C` chunks each.
type Stage<const C: usize> = [[__m512; C]; BLOCK_SIZE];

/// [`attend`] for heads of `C` 16-float chunks.
///
/// Keys and values stored in 16 bits are widened as they are loaded; when several rows share
/// the walk (prefill tiles, grouped heads) each block is widened once into a stack copy
/// instead, so the conversions do not repeat per row.
///
/// # Safety
/// As [`attend`], and `g.head_dim == 16 * C`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn attend_chunks<W: Widen, const C: usize>(
    g: &HeadGroup,
    keys: &[W::Elem],
    values: &[W::Elem],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let heads = g.heads();
    let mut end = [0usize; MAX_HEADS];
    for (h, end) in end.iter_mut().enumerate().take(heads) {
        *end = g.row_last(h) + 1;
    }
    let r = Rows {
        g,
        heads,
        span: g.span(),
        end,
    };
    let mut stage: Stage<C> = [[_mm512_setzero_ps(); C]; BLOCK_SIZE];
    let (kp, vp) = (keys.as_ptr(), values.as_ptr());

    let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); MAX_HEADS];
    for (pos, n, slot) in block_runs(g) {
        // SAFETY (all three): slot is inside the block, which lies inside `keys`, and its
        // first n positions are readable.
        let rows = unsafe { kp.add(slot * g.kv_dim + g.kv_off) };
        unsafe { cache_block_scores::<W, C>(&r, rows, &mut stage, pos, n, &mut max, scores) };
    }
    let mut max_all = [_mm512_setzero_ps(); MAX_HEADS];
    for (m, max) in max_all.iter_mut().zip(&max).take(heads) {
        *m = _mm512_set1_ps(_mm512_reduce_max_ps(*max));
    }

    // exp(s - max), their sums, and the unnormalised weighted sums of values, kept in `out`
    // between blocks (each block's values come from memory once for all rows).
    out.fill(0.0);
    let mut sum = [_mm512_setzero_ps(); MAX_HEADS];
    let mut sums = BlockSums {
        max: &max_all,
        sum: &mut sum,
        scores,
        out,
    };
    for (pos, n, slot) in block_runs(g) {
        // SAFETY (all three): as above, for `values`.
        let rows = unsafe { vp.add(slot * g.kv_dim + g.kv_off) };
        unsafe { cache_block_values::<W, C>(&r, rows, &mut stage, pos, n, &mut sums) };
    }
    for (h, sum) in sum.iter().enumerate().take(heads) {
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(*sum));
        // SAFETY: head h's output has C * 16 floats.
        let o = unsafe { out.as_mut_ptr().add(h * C * 16) };
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

/// One query token, all of its heads, against positions `first..=last` of its sequence: one
/// part of a decode step's attention when the context is split across threads.
///
/// Walks the cache block by block and, within a block, every kv head in turn, so each block's
/// keys (then values) are read as one contiguous run of `BLOCK_SIZE * kv_dim` elements. (Walking
/// one kv head over the whole context reads `head_dim` of every `kv_dim` elements, a strided
/// pattern that measured at well under half the memory bandwidth of a contiguous one.)
pub struct TokenPart<'a> {
    /// `num_heads * head_dim` floats, already rotated.
    pub q: &'a [f32],
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The sequence's cache blocks.
    pub blocks: &'a [u32],
    pub first: usize,
    pub last: usize,
    pub scale: f32,
}

/// What [`Avx512Attention::attend_part`] leaves, per head `h`: `max[h]`, the largest score of
/// the part; `sum[h]`, the sum of `exp(score - max[h])`; and `out[h * head_dim..]`, the sum of
/// values weighted by those exponentials, not yet divided by `sum[h]`. Parts of one context
/// combine exactly: rescale each by `exp(max - overall max)`, add, divide.
pub struct PartSums<'a> {
    pub out: &'a mut [f32],
    pub max: &'a mut [f32],
    pub sum: &'a mut [f32],
}

impl Avx512Attention {
    /// [`PartSums`] of one [`TokenPart`]; `scores` needs `num_heads * (last - first + 1)`
    /// floats.
    pub fn attend_part<E: KvElement>(
        self,
        part: &TokenPart,
        keys: &[E],
        values: &[E],
        scores: &mut [f32],
        sums: &mut PartSums,
    ) {
        let (d, nh, nkv) = (part.head_dim, part.num_heads, part.num_kv_heads);
        assert!(d.is_multiple_of(16) && d > 0 && d / 16 <= MAX_CHUNKS);
        assert!(nkv > 0 && nh.is_multiple_of(nkv) && part.q.len() == nh * d);
        assert!(sums.out.len() == nh * d && sums.max.len() == nh && sums.sum.len() == nh);
        assert!(part.first <= part.last && part.last / BLOCK_SIZE < part.blocks.len());
        assert!(scores.len() >= nh * (part.last + 1 - part.first));
        let kv_dim = nkv * d;
        for &b in &part.blocks[part.first / BLOCK_SIZE..=part.last / BLOCK_SIZE] {
            let end = (b as usize + 1) * BLOCK_SIZE * kv_dim;
            assert!(end <= keys.len() && end <= values.len());
        }
        // SAFETY: the token proves CPU support; every block the walk reads lies inside `keys`
        // and `values` (checked above) and every kv head lies inside a slot's `kv_dim`
        // elements; `scores` and the sums are large enough.
        unsafe {
            match d / 16 {
                1 => part_chunks::<E::Wide, 1>(part, keys, values, scores, sums),
                2 => part_chunks::<E::Wide, 2>(part, keys, values, scores, sums),
                3 => part_chunks::<E::Wide, 3>(part, keys, values, scores, sums),
                4 => part_chunks::<E::Wide, 4>(part, keys, values, scores, sums),
                5 => part_chunks::<E::Wide, 5>(part, keys, values, scores, sums),
                6 => part_chunks::<E::Wide, 6>(part, keys, values, scores, sums),
                7 => part_chunks::<E::Wide, 7>(part, keys, values, scores, sums),
                _ => part_chunks::<E::Wide, MAX_CHUNKS>(part, keys, values, scores, sums),
            }
        }
    }
}

/// [`Avx512Attention::attend_part`] for heads of `C` 16-float chunks.
///
/// The heads sharing a kv head go through the block kernels together, in runs of at most
/// [`MAX_HEADS`]; the running maxima and sums are kept per head as floats between blocks.
///
/// # Safety
/// As [`Avx512Attention::attend_part`] checks, and `part.head_dim == 16 * C`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn part_chunks<W: Widen, const C: usize>(
    part: &TokenPart,
    keys: &[W::Elem],
    values: &[W::Elem],
    scores: &mut [f32],
    sums: &mut PartSums,
) {
    let d = C * 16;
    let kv_dim = part.num_kv_heads * d;
    let group = part.num_heads / part.num_kv_heads;
    let runs_per_group = group.div_ceil(MAX_HEADS);
    let run_len = group.div_ceil(runs_per_group);
    let span = part.last + 1 - part.first;
    // Run i: its first head and head count, and its block-kernel view.
    let run = |i: usize| {
        let (kv_head, piece) = (i / runs_per_group, i % runs_per_group);
        let h0 = kv_head * group + piece * run_len;
        let n = run_len.min((kv_head + 1) * group - h0);
        let g = HeadGroup {
            q: &part.q[h0 * d..(h0 + n) * d],
            heads_per_token: n,
            head_dim: d,
            blocks: part.blocks,
            first: part.first,
            last: part.last,
            kv_off: kv_head * d,
            kv_dim,
            scale: part.scale,
        };
        (h0, n, g)
    };
    let n_runs = part.num_kv_heads * runs_per_group;
    let mut stage: Stage<C> = [[_mm512_setzero_ps(); C]; BLOCK_SIZE];
    let (kp, vp) = (keys.as_ptr(), values.as_ptr());
    let (walk_h0, walk_n, walk) = run(0);
    debug_assert!(walk_h0 == 0 && walk_n > 0);

    sums.max.fill(f32::NEG_INFINITY);
    let block_bytes = BLOCK_SIZE * kv_dim * std::mem::size_of::<W::Elem>();
    for (pos, n, slot) in prefetched_runs(&walk, kp, block_bytes) {
        for i in 0..n_runs {
            let (h0, nr, g) = run(i);
            let r = Rows::whole(&g);
            let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); MAX_HEADS];
            let sc = &mut scores[h0 * span..(h0 + nr) * span];
            // SAFETY: the slot's kv head lies inside the checked block.
            let rows = unsafe { kp.add(slot * kv_dim + g.kv_off) };
            unsafe { cache_block_scores::<W, C>(&r, rows, &mut stage, pos, n, &mut max, sc) };
            for (m, v) in sums.max[h0..h0 + nr].iter_mut().zip(&max) {
                *m = m.max(_mm512_reduce_max_ps(*v));
            }
        }
    }

    sums.out.fill(0.0);
    sums.sum.fill(0.0);
    for (pos, n, slot) in prefetched_runs(&walk, vp, block_bytes) {
        for i in 0..n_runs {
            let (h0, nr, g) = run(i);
            let r = Rows::whole(&g);
            let mut max = [_mm512_setzero_ps(); MAX_HEADS];
            for (v, &m) in max.iter_mut().zip(&sums.max[h0..h0 + nr]) {
                *v = _mm512_set1_ps(m);
            }
            let mut sum = [_mm512_setzero_ps(); MAX_HEADS];
            let mut acc = BlockSums {
                max: &max,
                sum: &mut sum,
                scores: &scores[h0 * span..(h0 + nr) * span],
                out: &mut sums.out[h0 * d..(h0 + nr) * d],
            };
            // SAFETY: as above, for `values`.
            let rows = unsafe { vp.add(slot * kv_dim + g.kv_off) };
            unsafe { cache_block_values::<W, C>(&r, rows, &mut stage, pos, n, &mut acc) };
            for (s, v) in sums.sum[h0..h0 + nr].iter_mut().zip(&sum) {
                *s += _mm512_reduce_add_ps(*v);
            }
        }
    }
}

/// The block runs of `g`, each yielded after asking for the following block of `base` (a
/// layer's keys or values; `block_bytes` per block) to be brought into L2.
fn prefetched_runs<'a, T: 'a>(
    g: &'a HeadGroup<'a>,
    base: *const T,
    block_bytes: usize,
) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let next = block_runs(g).skip(1).map(Some).chain([None]);
    let elems = g.kv_dim;
    block_runs(g).zip(next).map(move |(run, next)| {
        if let Some((_, _, slot)) = next {
            prefetch_to_l2(base.wrapping_add(slot * elems).cast(), block_bytes);
        }
        run
    })
}

/// Asks for `bytes` bytes from `p` to be brought into L2 (a hint: it never faults).
///
/// Why: the block kernels do several instructions per cache line they read, so the core's
/// own lookahead keeps few misses in flight; one thread read a cold cache at 8.4 GB/s without
/// this and 11.3 GB/s with the next block requested into L2 (SmolLM2's shape, 544 positions).
/// Into L1 instead, or two or four blocks ahead, gained less.
#[inline]
fn prefetch_to_l2(p: *const i8, bytes: usize) {
    let mut b = 0;
    while b < bytes {
        // SAFETY: SSE is part of every x86-64 CPU; a prefetch hint never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(b)) };
        b += 64;
    }
}

/// Whether a block run is widened into a stack copy before the block kernels read it: stored
/// in 16 bits and read by several rows, so the conversions are done once, not once per row.
fn stages<W: Widen>(r: &Rows) -> bool {
    std::mem::size_of::<W::Elem>() != 4 && r.heads > 1
}

/// [`block_scores`] over `n` positions read from the cache at `rows` (a slot's kv head, rows
/// `r.g.kv_dim` elements apart), through `stage` when [`stages`] says so.
///
/// # Safety
/// As [`block_scores`] for `rows` with stride `r.g.kv_dim`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn cache_block_scores<W: Widen, const C: usize>(
    r: &Rows,
    rows: *const W::Elem,
    stage: &mut Stage<C>,
    pos: usize,
    n: usize,
    max: &mut [__m512; MAX_HEADS],
    scores: &mut [f32],
) {
    // SAFETY (all three): forwarded; the stage holds n rows of C * 16 floats.
    if stages::<W>(r) {
        unsafe { widen_block::<W, C>(rows, r.g.kv_dim, n, stage) };
        let staged = stage.as_ptr().cast::<f32>();
        unsafe { block_scores::<F32, C>(r, staged, C * 16, pos, n, max, scores) };
    } else {
        unsafe { block_scores::<W, C>(r, rows, r.g.kv_dim, pos, n, max, scores) };
    }
}

/// [`block_values`] over `n` positions read from the cache at `rows`, as
/// [`cache_block_scores`] reads them.
///
/// # Safety
/// As [`block_values`] for `rows` with stride `r.g.kv_dim`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn cache_block_values<W: Widen, const C: usize>(
    r: &Rows,
    rows: *const W::Elem,
    stage: &mut Stage<C>,
    pos: usize,
    n: usize,
    acc: &mut BlockSums,
) {
    // SAFETY (all three): forwarded; the stage holds n rows of C * 16 floats.
    if stages::<W>(r) {
        unsafe { widen_block::<W, C>(rows, r.g.kv_dim, n, stage) };
        let staged = stage.as_ptr().cast::<f32>();
        unsafe { block_values::<F32, C>(r, staged, C * 16, pos, n, acc) };
    } else {
        unsafe { block_values::<W, C>(r, rows, r.g.kv_dim, pos, n, acc) };
    }
}

/// Copies `n` rows (`stride` elements apart) of a block into `stage`, widened to f32.
///
/// # Safety
/// AVX-512 F/BW/VL available; rows `0..n` of `C * 16` elements readable from `rows`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_block<W: Widen, const C: usize>(
    rows: *const W::Elem,
    stride: usize,
    n: usize,
    stage: &mut Stage<C>,
) {
    for (i, staged) in stage.iter_mut().enumerate().take(n) {
        for (c, v) in staged.iter_mut().enumerate() {
            // SAFETY: row i < n, chunk c < C.
            *v = unsafe { W::load(rows.add(i * stride + c * 16)) };
        }
    }
}

/// One block run's scores for every row: `scores[h * span + pos - first ..][..n]`, and each
/// row's running maximum.
///
/// Scores of 16 positions are reduced together. Every row computes all 16 lanes, so the loop
/// has no run-time bound: lanes past the row's count repeat its last position and are
/// masked off.
///
/// # Safety
/// AVX-512 F/BW/VL available; positions `0..n` of the run readable from `rows`, `stride`
/// elements apart; `scores` as [`attend`] requires.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn block_scores<L: Widen, const C: usize>(
    r: &Rows,
    rows: *const L::Elem,
    stride: usize,
    pos: usize,
    n: usize,
    max: &mut [__m512; MAX_HEADS],
    scores: &mut [f32],
) {
    let g = r.g;
    let scale = _mm512_set1_ps(g.scale);
    for (h, max) in max.iter_mut().enumerate().take(r.heads) {
        let n = r.count(h, pos, n);
        if n == 0 {
            continue;
        }
        let mut q = [_mm512_setzero_ps(); C];
        for (c, q) in q.iter_mut().enumerate() {
            // SAFETY: (h * C + c) * 16 + 16 <= q.len().
            *q = unsafe { _mm512_loadu_ps(g.q.as_ptr().add((h * C + c) * 16)) };
        }
        let mut v = [_mm512_setzero_ps(); 16];
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: position i.min(n - 1) of the run is readable.
            let row = unsafe { rows.add(i.min(n - 1) * stride) };
            // Two partial sums, so the multiply-adds of one position form two short
            // dependency chains rather than one long one.
            let mut acc = [_mm512_setzero_ps(); 2];
            for (c, q) in q.iter().enumerate() {
                // SAFETY: as above; c * 16 + 16 <= head_dim.
                let k = unsafe { L::load(row.add(c * 16)) };
                acc[c % 2] = _mm512_fmadd_ps(*q, k, acc[c % 2]);
            }
            *v = _mm512_add_ps(acc[0], acc[1]);
        }
        let mask = lanes(n);
        let s = _mm512_mul_ps(sums_in_order(&v), scale);
        *max = _mm512_mask_max_ps(*max, mask, *max, s);
        let at = h * r.span + pos - g.first;
        // SAFETY: at + n <= heads * span.
        unsafe { _mm512_mask_storeu_ps(scores.as_mut_ptr().add(at), mask, s) };
    }
}

/// The softmax's second pass: each row's maximum, and what it accumulates.
struct BlockSums<'a> {
    max: &'a [__m512; MAX_HEADS],
    sum: &'a mut [__m512; MAX_HEADS],
    scores: &'a [f32],
    out: &'a mut [f32],
}

/// One block run's share of every row's softmax sum and weighted sum of values (in `out`).
///
/// # Safety
/// AVX-512 F/BW/VL available; positions `0..n` of the run readable from `rows`, `stride`
/// elements apart; `out` holds `heads * C * 16` floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn block_values<L: Widen, const C: usize>(
    r: &Rows,
    rows: *const L::Elem,
    stride: usize,
    pos: usize,
    n: usize,
    acc: &mut BlockSums,
) {
    for h in 0..r.heads {
        let n = r.count(h, pos, n);
        if n == 0 {
            continue;
        }
        let mask = lanes(n);
        let at = h * r.span + pos - r.g.first;
        // SAFETY: at + n <= heads * span.
        let s = unsafe { _mm512_maskz_loadu_ps(mask, acc.scores.as_ptr().add(at)) };
        let e = _mm512_maskz_mov_ps(mask, exp(_mm512_sub_ps(s, acc.max[h])));
        acc.sum[h] = _mm512_add_ps(acc.sum[h], e);
        let mut weights = [0.0f32; 16];
        // SAFETY: `weights` holds 16 floats.
        unsafe { _mm512_storeu_ps(weights.as_mut_ptr(), e) };
        // SAFETY: head h's output has C * 16 floats.
        let o = unsafe { acc.out.as_mut_ptr().add(h * C * 16) };
        // Even and odd positions accumulate apart (two independent chains per chunk), then
        // meet in `out`. All 16 lanes again: past the row's count the weight is 0 and the row
        // repeated is a real (finite) one.
        let mut even = [_mm512_setzero_ps(); C];
        let mut odd = [_mm512_setzero_ps(); C];
        for (c, even) in even.iter_mut().enumerate() {
            // SAFETY: as above.
            *even = unsafe { _mm512_loadu_ps(o.add(c * 16)) };
        }
        for i in (0..16).step_by(2) {
            let (w0, w1) = (_mm512_set1_ps(weights[i]), _mm512_set1_ps(weights[i + 1]));
            // SAFETY: positions i.min(n - 1) and (i + 1).min(n - 1) are readable.
            let (r0, r1) = unsafe {
                (
                    rows.add(i.min(n - 1) * stride),
                    rows.add((i + 1).min(n - 1) * stride),
                )
            };
            for c in 0..C {
                // SAFETY: c * 16 + 16 <= head_dim.
                let (v0, v1) = unsafe { (L::load(r0.add(c * 16)), L::load(r1.add(c * 16))) };
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
