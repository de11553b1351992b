//! One query head's attention with AVX-512, for head sizes that are a multiple of 16 (up to
//! 128): the common case, and the one whose speed matters at long contexts.
//!
//! The cache stores a sequence's positions in blocks of [`BLOCK_SIZE`] consecutive slots, so
//! the kernel walks the block table and reads each block's keys and values as plain strided
//! rows. Scores of 16 positions are reduced together (one shuffle tree instead of 16
//! horizontal sums); softmax uses a vectorised `exp`; the weighted sum of values stays in
//! registers and is divided by the softmax denominator once at the end.
//!
//! The result equals the portable path's up to float rounding: sums are grouped differently
//! and `exp` is a polynomial accurate to about 2 ulp.

use std::arch::x86_64::*;

use crate::model::cpu::matmul::avx512_reduce16 as reduce16;
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

/// One query head against positions `first..=last` of one sequence.
pub struct HeadQuery<'a> {
    /// The query head (`head_dim` floats, already rotated).
    pub q: &'a [f32],
    /// The sequence's cache blocks.
    pub blocks: &'a [u32],
    pub first: usize,
    pub last: usize,
    /// Offset of this head's kv head within a slot's `kv_dim` floats.
    pub kv_off: usize,
    pub kv_dim: usize,
    pub scale: f32,
}

impl Avx512Attention {
    /// `out = softmax(q · K / sqrt(d)) · V`; `scores` needs `last - first + 1` floats.
    pub fn attend(
        self,
        head: &HeadQuery,
        keys: &[f32],
        values: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let d = head.q.len();
        let span = head.last + 1 - head.first;
        assert!(d.is_multiple_of(16) && d / 16 <= MAX_CHUNKS && out.len() == d);
        assert!(scores.len() >= span && head.kv_off + d <= head.kv_dim);
        assert!(head.last / BLOCK_SIZE < head.blocks.len());
        for &b in &head.blocks[head.first / BLOCK_SIZE..=head.last / BLOCK_SIZE] {
            let end = (b as usize + 1) * BLOCK_SIZE * head.kv_dim;
            assert!(end <= keys.len() && end <= values.len());
        }
        // SAFETY: the token proves CPU support; every block the walk reads lies inside
        // `keys` and `values` (checked above), `scores` holds `span` floats and `out` `d`.
        unsafe { attend(head, keys, values, &mut scores[..span], out) }
    }
}

/// Positions `first..=last` grouped by cache block: (first position, count, first slot).
fn block_runs<'a>(head: &'a HeadQuery<'a>) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let mut pos = head.first;
    std::iter::from_fn(move || {
        if pos > head.last {
            return None;
        }
        let in_block = pos % BLOCK_SIZE;
        let n = (BLOCK_SIZE - in_block).min(head.last + 1 - pos);
        let slot = head.blocks[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + in_block;
        let run = (pos, n, slot);
        pos += n;
        Some(run)
    })
}

/// # Safety
/// AVX-512 F/BW/VL available; the bounds [`Avx512Attention::attend`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn attend(
    head: &HeadQuery,
    keys: &[f32],
    values: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let chunks = head.q.len() / 16;
    let mut q = [_mm512_setzero_ps(); MAX_CHUNKS];
    for (c, q) in q.iter_mut().enumerate().take(chunks) {
        // SAFETY: c * 16 + 16 <= d.
        *q = unsafe { _mm512_loadu_ps(head.q.as_ptr().add(c * 16)) };
    }
    let scale = _mm512_set1_ps(head.scale);
    let (kp, vp) = (keys.as_ptr(), values.as_ptr());

    // Scores, 16 positions per reduction (a block run has at most 16).
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for (pos, n, slot) in block_runs(head) {
        let mut v = [_mm512_setzero_ps(); 16];
        for i in 0..n {
            // SAFETY: slot + i is inside the block, which lies inside `keys`.
            let row = unsafe { kp.add((slot + i) * head.kv_dim + head.kv_off) };
            let mut acc = _mm512_setzero_ps();
            for (c, q) in q.iter().enumerate().take(chunks) {
                acc = _mm512_fmadd_ps(*q, unsafe { _mm512_loadu_ps(row.add(c * 16)) }, acc);
            }
            // reduce16 leaves the sum of v[4a + b] in lane 4b + a: position i goes to lane i.
            v[4 * (i % 4) + i / 4] = acc;
        }
        let s = _mm512_mul_ps(reduce16(&v), scale);
        let mask = lanes(n);
        max = _mm512_mask_max_ps(max, mask, max, s);
        // SAFETY: pos - first + n <= span.
        unsafe { _mm512_mask_storeu_ps(scores.as_mut_ptr().add(pos - head.first), mask, s) };
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));

    // exp(s - max), their sum, and the unnormalised weighted sum of values.
    let mut sum = _mm512_setzero_ps();
    let mut acc = [_mm512_setzero_ps(); MAX_CHUNKS];
    for (pos, n, slot) in block_runs(head) {
        let at = pos - head.first;
        let mask = lanes(n);
        // SAFETY: at + n <= span.
        let s = unsafe { _mm512_maskz_loadu_ps(mask, scores.as_ptr().add(at)) };
        let e = _mm512_maskz_mov_ps(mask, exp(_mm512_sub_ps(s, max)));
        sum = _mm512_add_ps(sum, e);
        let mut weights = [0.0f32; 16];
        // SAFETY: `weights` holds 16 floats.
        unsafe { _mm512_storeu_ps(weights.as_mut_ptr(), e) };
        for (i, &w) in weights.iter().enumerate().take(n) {
            let w = _mm512_set1_ps(w);
            // SAFETY: slot + i is inside the block, which lies inside `values`.
            let row = unsafe { vp.add((slot + i) * head.kv_dim + head.kv_off) };
            for (c, acc) in acc.iter_mut().enumerate().take(chunks) {
                *acc = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(row.add(c * 16)) }, *acc);
            }
        }
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    for (c, acc) in acc.iter().enumerate().take(chunks) {
        // SAFETY: out holds d = chunks * 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), _mm512_mul_ps(*acc, inv)) };
    }
}

/// The lanes `0..n` (`n <= 16`).
#[inline]
fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// `e^x` per lane for `x <= 0` (softmax's shifted scores); about 2 ulp. Large negative inputs
/// give 0, as they should.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn exp(x: __m512) -> __m512 {
    // e^x = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2].
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // ln 2 split in two so that n * LN2_HI is exact.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    // Taylor terms up to r^7: below f32 resolution on this interval.
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        if Avx512Attention::new(16).is_none() {
            return;
        }
        let mut worst = 0.0f64;
        let mut x = -110.0f32;
        while x <= 0.0 {
            let xs: Vec<f32> = (0..16)
                .map(|i| x + i as f32 * 0.0007)
                .map(|v| v.min(0.0))
                .collect();
            let mut got = [0.0f32; 16];
            // SAFETY: AVX-512 present (checked above); 16 floats in and out.
            unsafe {
                _mm512_storeu_ps(got.as_mut_ptr(), exp(_mm512_loadu_ps(xs.as_ptr())));
            }
            for (&g, &v) in got.iter().zip(&xs) {
                let want = (v as f64).exp();
                if want > 1e-37 {
                    worst = worst.max(((g as f64 - want) / want).abs());
                } else {
                    assert!(g.abs() < 1e-37, "exp({v}) = {g}");
                }
            }
            x += 0.0113;
        }
        assert!(worst < 4e-7, "relative error {worst}");
    }
}
