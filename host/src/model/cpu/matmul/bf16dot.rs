//! The fast path for bf16 weights (`Numerics::Fast`): activations rounded to bf16 once per
//! product, then AVX512-BF16's `vdpbf16ps`, which multiplies 32 bf16 pairs and adds them into
//! 16 f32 sums in one instruction: twice the multiply-adds of an f32 FMA per instruction,
//! and no widening of the weights.
//!
//! Same dot-product form as the f32 kernels (both operands contiguous along `k`, a tile of up
//! to 4 tokens x 4 rows in 16 accumulators, one horizontal reduction at the end). Two
//! schedules:
//! - up to 4 tokens (decode): the threads split the rows; each task streams its rows once,
//!   prefetching ahead.
//! - more tokens (prefill): each task takes a panel of rows small enough to stay in L2 and
//!   runs every token tile over it, row tile by row tile, so the weights come from memory
//!   once and a token tile's activations stay in L1 across the panel.

use std::arch::x86_64::*;

use super::avx512::{lane_sums, lanes, tile_sums};
use super::{job_size, run_tasks, threads_for, OutPtr, Part, TaskSplit, ThreadPool, WeightData};

/// Proof that the CPU supports AVX-512 F, BW, VL and BF16.
#[derive(Clone, Copy)]
pub(super) struct Bf16Dot(());

impl Bf16Dot {
    pub(super) fn new() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16");
        ok.then_some(Bf16Dot(()))
    }

    /// `dst[i]` = `src[i]` rounded to bf16 (nearest even; subnormals become zero).
    pub(super) fn round_to_bf16(self, src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: the token proves CPU support; lengths are equal (checked).
        unsafe { round_to_bf16(src, dst, None) }
    }

    /// `hi[i]` = `src[i]` rounded to bf16, `lo[i]` = the remainder `src[i] - hi[i]` rounded
    /// to bf16: together 16 significant bits of `src[i]`.
    pub(super) fn split_to_bf16(self, src: &[f32], hi: &mut [u16], lo: &mut [u16]) {
        assert_eq!(src.len(), hi.len());
        assert_eq!(src.len(), lo.len());
        // SAFETY: the token proves CPU support; lengths are equal (checked).
        unsafe { round_to_bf16(src, hi, Some(lo)) }
    }
}

/// Tokens and rows of the micro-kernel tile.
const TILE: usize = 4;

/// Weight bytes of one prefill panel: with a token tile's activations it stays in L2.
const PANEL_BYTES: usize = 256 << 10;

/// Bf16 weights times bf16-rounded activations, for one or more matrices of equal `cols`.
pub(super) struct Product<'a> {
    /// `[n_tokens, cols]` activations, rounded to bf16.
    pub x: &'a [u16],
    /// With [`super::Precision::Bf16Split`]: what rounding `x` left, rounded to bf16.
    pub x_lo: Option<&'a [u16]>,
    pub n_tokens: usize,
    pub cols: usize,
    pub parts: &'a [Option<Part<'a>>],
}

impl Product<'_> {
    pub(super) fn run(&self, k: Bf16Dot, pool: &ThreadPool) {
        assert_eq!(self.x.len(), self.n_tokens * self.cols);
        if let Some(lo) = self.x_lo {
            assert_eq!(lo.len(), self.x.len());
        }
        let (rows, work) = job_size(self.parts, self.n_tokens);
        if rows == 0 || self.n_tokens == 0 {
            return;
        }
        let threads = threads_for(pool, work);
        let split = if self.n_tokens <= TILE {
            // One token reduces rows sixteen at a time.
            TaskSplit::guided(self.parts, threads, 16)
        } else {
            // A panel fits in L2, and every thread gets at least two.
            let per = (PANEL_BYTES / (2 * self.cols)).min(rows.div_ceil(2 * threads));
            TaskSplit::even(self.parts, per.next_multiple_of(TILE).max(TILE))
        };
        run_tasks(pool, threads, self.parts, &split, |part, r0, r1| {
            let WeightData::Bf16(w) = part.w.data else {
                unreachable!("the bf16 path only takes bf16 weights");
            };
            assert_eq!(w.len(), part.w.rows * self.cols);
            // SAFETY: the token proves CPU support. Rows r0..r1 of `w` and every token of
            // `x` are in bounds (checked above); tasks own disjoint rows of each part's
            // output, which outlives the product.
            unsafe { self.rows(k, w, part.out, part.w.rows, r0, r1) };
        });
    }

    /// Rows `r0..r1` for every token: token tiles outside, row tiles inside.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/BF16 available; `w` holds `out_rows * cols` elements, `r1 <= out_rows`;
    /// `out` holds `n_tokens * out_rows` floats, and no other thread touches rows `r0..r1`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn rows(
        &self,
        _k: Bf16Dot,
        w: &[u16],
        out: OutPtr,
        out_rows: usize,
        r0: usize,
        r1: usize,
    ) {
        let (cols, x, w) = (self.cols, self.x.as_ptr(), w.as_ptr());
        let x_lo = self.x_lo.map(|lo| lo.as_ptr());
        if self.n_tokens == 1 {
            // One token: each row is one dot product, rows in memory order, so the task
            // reads its weights as a single sequential stream. Sixteen rows' vector sums are
            // reduced together, which costs far less than sixteen separate reductions.
            let mut r = r0;
            while r < r1 {
                let n = (r1 - r).min(16);
                let mut v = [_mm512_setzero_ps(); 16];
                for (i, v) in v.iter_mut().take(n).enumerate() {
                    // SAFETY: row r + i is in bounds; `x` holds `cols` elements.
                    let row = unsafe { w.add((r + i) * cols) };
                    *v = match x_lo {
                        // SAFETY: as above; `x_lo` holds `cols` elements too.
                        Some(lo) => unsafe { dot_row::<true>(x, lo, row, cols) },
                        None => unsafe { dot_row::<false>(x, x, row, cols) },
                    };
                }
                let sums = lane_sums(&v);
                for (i, &value) in sums.iter().enumerate().take(n) {
                    assert!(r + i < out.len);
                    // SAFETY: in bounds; this task alone writes rows r0..r1.
                    unsafe { *out.ptr.add(r + i) = value };
                }
                r += n;
            }
            return;
        }
        let mut t0 = 0;
        while t0 < self.n_tokens {
            let nt = (self.n_tokens - t0).min(TILE);
            // SAFETY (pointer offsets): tokens and rows stay inside the checked bounds.
            let xt = unsafe { x.add(t0 * cols) };
            let mut g0 = r0;
            while g0 < r1 {
                let nr = (r1 - g0).min(TILE);
                let wr = unsafe { w.add(g0 * cols) };
                // SAFETY: tokens t0..t0+nt and rows g0..g0+nr are in bounds.
                let mut sums = unsafe { tile_dispatch(nt, nr, xt, wr, cols) };
                if let Some(lo) = x_lo {
                    // SAFETY: as above; `x_lo` has the same shape as `x`.
                    let lo_sums = unsafe { tile_dispatch(nt, nr, lo.add(t0 * cols), wr, cols) };
                    for (s, l) in sums.iter_mut().zip(lo_sums) {
                        *s += l;
                    }
                }
                for t in 0..nt {
                    for r in 0..nr {
                        let i = (t0 + t) * out_rows + g0 + r;
                        assert!(i < out.len);
                        // SAFETY: in bounds; this task alone writes rows r0..r1.
                        unsafe { *out.ptr.add(i) = sums[TILE * t + r] };
                    }
                }
                g0 += nr;
            }
            t0 += nt;
        }
    }
}

/// `sum_{k < len} x[k] * w[k]`, as 16 partial sums, with four independent accumulators, so the multiply-adds'
/// latency never limits how fast the row streams in.
///
/// # Safety
/// AVX-512 F/BW/VL/BF16 available; `x[0..len]` and `w[0..len]` readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dot_row<const SPLIT: bool>(
    x: *const u16,
    x_lo: *const u16,
    w: *const u16,
    len: usize,
) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let load = |p: *const u16| as_bh(unsafe { _mm512_loadu_si512(p.cast()) });
    let mut k = 0;
    // SAFETY (all loads): k + 128 <= len, k + 32 <= len, or masked to k..len; `x_lo` is only
    // read when SPLIT, and then has `len` elements too.
    while k + 128 <= len {
        for (i, acc) in acc.iter_mut().enumerate() {
            let at = k + 32 * i;
            let wv = load(w.wrapping_add(at));
            *acc = _mm512_dpbf16_ps(*acc, load(x.wrapping_add(at)), wv);
            if SPLIT {
                *acc = _mm512_dpbf16_ps(*acc, load(x_lo.wrapping_add(at)), wv);
            }
        }
        k += 128;
    }
    let mut i = 0;
    while k + 32 <= len {
        let wv = load(w.wrapping_add(k));
        acc[i] = _mm512_dpbf16_ps(acc[i], load(x.wrapping_add(k)), wv);
        if SPLIT {
            acc[i] = _mm512_dpbf16_ps(acc[i], load(x_lo.wrapping_add(k)), wv);
        }
        i = (i + 1) % 4;
        k += 32;
    }
    if k < len {
        let mask = ((1u64 << (len - k)) - 1) as __mmask32;
        let part = |p: *const u16| as_bh(unsafe { _mm512_maskz_loadu_epi16(mask, p.cast()) });
        let wv = part(w.wrapping_add(k));
        acc[i] = _mm512_dpbf16_ps(acc[i], part(x.wrapping_add(k)), wv);
        if SPLIT {
            acc[i] = _mm512_dpbf16_ps(acc[i], part(x_lo.wrapping_add(k)), wv);
        }
    }
    _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))
}

/// # Safety
/// As [`tile`], for `nt` tokens and `nr` rows (each 1..=4).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile_dispatch(
    nt: usize,
    nr: usize,
    x: *const u16,
    w: *const u16,
    len: usize,
) -> [f32; 16] {
    // SAFETY: forwarded contract.
    unsafe {
        match (nt, nr) {
            (4, 4) => tile::<4, 4>(x, w, len),
            (4, 3) => tile::<4, 3>(x, w, len),
            (4, 2) => tile::<4, 2>(x, w, len),
            (4, _) => tile::<4, 1>(x, w, len),
            (3, 4) => tile::<3, 4>(x, w, len),
            (3, 3) => tile::<3, 3>(x, w, len),
            (3, 2) => tile::<3, 2>(x, w, len),
            (3, _) => tile::<3, 1>(x, w, len),
            (2, 4) => tile::<2, 4>(x, w, len),
            (2, 3) => tile::<2, 3>(x, w, len),
            (2, 2) => tile::<2, 2>(x, w, len),
            (2, _) => tile::<2, 1>(x, w, len),
            (_, 4) => tile::<1, 4>(x, w, len),
            (_, 3) => tile::<1, 3>(x, w, len),
            (_, 2) => tile::<1, 2>(x, w, len),
            (_, _) => tile::<1, 1>(x, w, len),
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64-byte plain vector types; every bit pattern is valid for either.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// `sums[4 * t + r] = sum_{k < len} x_t[k] * w_r[k]`, `x_t = x + t * len`, `w_r = w + r * len`,
/// each pair product exact and summed in f32.
///
/// # Safety
/// AVX-512 F/BW/VL/BF16 available; `x_t[0..len]`, `w_r[0..len]` readable for `t < NT`, `r < NR`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::needless_range_loop)] // index loops over the const-size register tile
unsafe fn tile<const NT: usize, const NR: usize>(
    x: *const u16,
    w: *const u16,
    len: usize,
) -> [f32; 16] {
    let mut acc = [[_mm512_setzero_ps(); NR]; NT];
    let mut wv = [as_bh(_mm512_setzero_si512()); NR];
    let mut k = 0;
    while k + 32 <= len {
        for r in 0..NR {
            // SAFETY: k + 32 <= len, so w_r[k..k + 32] is readable.
            wv[r] = as_bh(unsafe { _mm512_loadu_si512(w.add(r * len + k).cast()) });
        }
        for t in 0..NT {
            // SAFETY: as above, for x_t.
            let xv = as_bh(unsafe { _mm512_loadu_si512(x.add(t * len + k).cast()) });
            for r in 0..NR {
                acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
            }
        }
        k += 32;
    }
    if k < len {
        let mask = ((1u64 << (len - k)) - 1) as __mmask32;
        for r in 0..NR {
            // SAFETY: the masked load reads only w_r[k..len].
            wv[r] = as_bh(unsafe { _mm512_maskz_loadu_epi16(mask, w.add(r * len + k).cast()) });
        }
        for t in 0..NT {
            // SAFETY: the masked load reads only x_t[k..len].
            let xv = as_bh(unsafe { _mm512_maskz_loadu_epi16(mask, x.add(t * len + k).cast()) });
            for r in 0..NR {
                acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
            }
        }
    }
    tile_sums(&acc)
}

/// # Safety
/// AVX-512 F/BW/VL/BF16 available; `dst` and `lo` (if any) as long as `src`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn round_to_bf16(src: &[f32], dst: &mut [u16], lo: Option<&mut [u16]>) {
    let n = src.len();
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let l = lo.map(|lo| lo.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let mask = lanes((n - i).min(16));
        // SAFETY: the masked loads and stores touch only elements i..n.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, s.add(i));
            let hi = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(d.add(i).cast(), mask, hi);
            if let Some(l) = l {
                // hi widened back to f32 is its bits shifted up by 16.
                let hi_f32 =
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)));
                let rest = _mm512_cvtneps_pbh(_mm512_sub_ps(v, hi_f32));
                let rest = std::mem::transmute::<__m256bh, __m256i>(rest);
                _mm256_mask_storeu_epi16(l.add(i).cast(), mask, rest);
            }
        }
        i += 16;
    }
}
