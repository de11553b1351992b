//! AVX-512 kernels: 16 f32 lanes, micro-kernel tiles of up to 4 tokens x 4 rows (16 zmm
//! accumulators), masked loads for column tails.

use std::arch::x86_64::*;

use super::{Block, Kernels, OutBlock, WeightData};

/// Proof that the CPU supports AVX-512 F, BW and VL.
#[derive(Clone, Copy)]
pub(super) struct Avx512(());

impl Avx512 {
    pub(super) fn new() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        ok.then_some(Avx512(()))
    }
}

impl Kernels for Avx512 {
    const TOKENS: usize = 4;
    const ROWS: usize = 4;

    fn gemm(self, block: &Block, out: &OutBlock) {
        block.assert_in_bounds();
        // SAFETY: the token proves CPU support; the block's reads are in bounds (checked).
        unsafe {
            match block.w {
                WeightData::F32(w) => gemm::<F32>(block, w, out),
                WeightData::Bf16(w) => gemm::<Bf16>(block, w, out),
                WeightData::F16(w) => gemm::<F16>(block, w, out),
                WeightData::Quant(..) => unreachable!("quantized weights go through panels"),
            }
        }
    }

    fn widen(self, src: WeightData, stride: usize, n_rows: usize, len: usize, dst: &mut [f32]) {
        assert!(dst.len() >= n_rows * len);
        if n_rows == 0 {
            return;
        }
        let need = (n_rows - 1) * stride + len;
        // SAFETY: the token proves CPU support; `need` bounds every read, `dst` every write.
        unsafe {
            match src {
                WeightData::F32(s) => widen::<F32>(&s[..need], stride, n_rows, len, dst),
                WeightData::Bf16(s) => widen::<Bf16>(&s[..need], stride, n_rows, len, dst),
                WeightData::F16(s) => widen::<F16>(&s[..need], stride, n_rows, len, dst),
                WeightData::Quant(..) => super::dequant::widen_quant(src, stride, n_rows, len, dst),
            }
        }
    }
}

/// A stored weight dtype and how to widen 16 of its elements into a zmm of f32.
pub(crate) trait Widen {
    type Elem: Copy;
    /// How many elements ahead to prefetch each weight row (0: none). Streaming 16-bit
    /// weights from DRAM gains a little from it; f32 streams (and panels in L2) do not.
    const PREFETCH: usize;
    /// Loads `p[0..16]` as f32.
    unsafe fn load(p: *const Self::Elem) -> __m512;
    /// Loads `p[0..n]` (`n < 16`) as f32, zero in the other lanes; reads nothing past `n`.
    unsafe fn load_tail(p: *const Self::Elem, mask: __mmask16) -> __m512;
}

pub(crate) struct F32;
pub(super) struct Bf16;
pub(crate) struct F16;

impl Widen for F32 {
    type Elem = f32;
    const PREFETCH: usize = 0;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_tail(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn bf16_bits_to_ps(bits: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
}

impl Widen for Bf16 {
    type Elem = u16;
    const PREFETCH: usize = 512;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load(p: *const u16) -> __m512 {
        bf16_bits_to_ps(_mm256_loadu_si256(p.cast()))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_tail(p: *const u16, mask: __mmask16) -> __m512 {
        bf16_bits_to_ps(_mm256_maskz_loadu_epi16(mask, p.cast()))
    }
}

impl Widen for F16 {
    type Elem = u16;
    const PREFETCH: usize = 512;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_tail(p: *const u16, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast()))
    }
}

/// The lanes `0..n` (`n <= 16`).
#[inline]
pub(crate) fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// Lane `i` of the result is the sum of the lanes of `v[i]` (one [`reduce16`] tree).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn sums_in_order(v: &[__m512; 16]) -> __m512 {
    // reduce16 leaves the sum of v[4b + a] in lane 4a + b: put vector i = 4a + b there.
    let mut placed = [_mm512_setzero_ps(); 16];
    for (i, v) in v.iter().enumerate() {
        placed[4 * (i % 4) + i / 4] = *v;
    }
    reduce16(&placed)
}

/// [`sums_in_order`], stored: `sums[i]` is the sum of the lanes of `v[i]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn lane_sums(v: &[__m512; 16]) -> [f32; 16] {
    let mut sums = [0.0f32; 16];
    // SAFETY: `sums` has room for 16 floats.
    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), sums_in_order(v)) };
    sums
}

/// Sums each of 16 vectors: lane `4 * i + j` of the result is the sum of `v[4 * j + i]`.
/// A shuffle tree: 30 shuffles and 15 adds instead of 16 separate reductions.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn reduce16(v: &[__m512; 16]) -> __m512 {
    // Fold 256-bit halves: s[i] holds v[2i] in 128-bit lanes 0-1, v[2i+1] in lanes 2-3.
    let mut s = [_mm512_setzero_ps(); 8];
    for (i, s) in s.iter_mut().enumerate() {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        *s = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        );
    }
    // Fold 128-bit lanes: u[i] holds v[4i + l] in 128-bit lane l.
    let mut u = [_mm512_setzero_ps(); 4];
    for (i, u) in u.iter_mut().enumerate() {
        let (a, b) = (s[2 * i], s[2 * i + 1]);
        *u = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        );
    }
    // Within each 128-bit lane l: fold pairs, then quads, interleaving u[0..4].
    let p = _mm512_add_ps(
        _mm512_unpacklo_ps(u[0], u[1]),
        _mm512_unpackhi_ps(u[0], u[1]),
    );
    let q = _mm512_add_ps(
        _mm512_unpacklo_ps(u[2], u[3]),
        _mm512_unpackhi_ps(u[2], u[3]),
    );
    let (p, q) = (_mm512_castps_pd(p), _mm512_castps_pd(q));
    _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(p, q)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)),
    )
}

/// One micro-kernel tile: returns `sums[4 * t + r] = sum_{k < len} x_t[k] * w_r[k]` with
/// `x_t = x + t * xs`, `w_r = w + r * ws`.
///
/// # Safety
/// AVX-512 F/BW/VL available; `x_t[0..len]` and `w_r[0..len]` readable for `t < NT`, `r < NR`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::needless_range_loop)] // index loops over the const-size register tile
unsafe fn tile<W: Widen, const NT: usize, const NR: usize>(
    x: *const f32,
    xs: usize,
    w: *const W::Elem,
    ws: usize,
    len: usize,
) -> [f32; 16] {
    let mut acc = [[_mm512_setzero_ps(); NR]; NT];
    let mut wv = [_mm512_setzero_ps(); NR];
    let mut k = 0;
    while k + 16 <= len {
        for r in 0..NR {
            // SAFETY: k + 16 <= len, so w_r[k..k + 16] is readable.
            wv[r] = unsafe { W::load(w.add(r * ws + k)) };
            if W::PREFETCH > 0 {
                // A hint only: it never faults, so running past the row's end is harmless.
                let ahead = w.wrapping_add(r * ws + k + W::PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
        }
        for t in 0..NT {
            // SAFETY: as above, for x_t.
            let xv = unsafe { _mm512_loadu_ps(x.add(t * xs + k)) };
            for r in 0..NR {
                acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
            }
        }
        k += 16;
    }
    if k < len {
        let mask = lanes(len - k);
        for r in 0..NR {
            // SAFETY: the masked load reads only w_r[k..len].
            wv[r] = unsafe { W::load_tail(w.add(r * ws + k), mask) };
        }
        for t in 0..NT {
            // SAFETY: the masked load reads only x_t[k..len].
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.add(t * xs + k)) };
            for r in 0..NR {
                acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
            }
        }
    }
    tile_sums(&acc)
}

/// The sums of a tile's accumulators: `sums[4 * t + r]` = the lanes of `acc[t][r]` added up.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::needless_range_loop)] // index loops over the const-size register tile
pub(super) fn tile_sums<const NT: usize, const NR: usize>(acc: &[[__m512; NR]; NT]) -> [f32; 16] {
    let mut v = [_mm512_setzero_ps(); 16];
    for t in 0..NT {
        for r in 0..NR {
            v[4 * t + r] = acc[t][r];
        }
    }
    lane_sums(&v)
}

/// `sum_{k < len} x[k] * w[k]` as 16 partial sums, with four independent accumulators so
/// the multiply-adds' latency never limits the stream.
///
/// # Safety
/// AVX-512 F/BW/VL available; `x[0..len]` and `w[0..len]` readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn dot_row<X: Widen, W: Widen>(
    x: *const X::Elem,
    w: *const W::Elem,
    len: usize,
) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut k = 0;
    // SAFETY (all loads): k + 64 <= len, k + 16 <= len, or masked to k..len.
    while k + 64 <= len {
        for (i, acc) in acc.iter_mut().enumerate() {
            let at = k + 16 * i;
            let wv = unsafe { W::load(w.add(at)) };
            *acc = _mm512_fmadd_ps(unsafe { X::load(x.add(at)) }, wv, *acc);
        }
        k += 64;
    }
    let mut i = 0;
    while k + 16 <= len {
        let wv = unsafe { W::load(w.add(k)) };
        acc[i] = _mm512_fmadd_ps(unsafe { X::load(x.add(k)) }, wv, acc[i]);
        i = (i + 1) % 4;
        k += 16;
    }
    if k < len {
        let mask = lanes(len - k);
        let wv = unsafe { W::load_tail(w.add(k), mask) };
        let xv = unsafe { X::load_tail(x.add(k), mask) };
        acc[i] = _mm512_fmadd_ps(xv, wv, acc[i]);
    }
    _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))
}

/// # Safety
/// AVX-512 F/BW/VL available; `block` in bounds (`assert_in_bounds`), `w` is `block.w`'s slice.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn gemm<W: Widen>(block: &Block, w: &[W::Elem], out: &OutBlock) {
    let (x, xs, ws, len) = (block.x.as_ptr(), block.x_stride, block.w_stride, block.len);
    let w = w.as_ptr();
    if block.n_tokens == 1 {
        // One token: one dot product per row, rows in memory order, so the weights stream in
        // as one sequential read; sixteen rows' vector sums are reduced together.
        let mut r0 = 0;
        while r0 < block.n_rows {
            let n = (block.n_rows - r0).min(16);
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, v) in v.iter_mut().take(n).enumerate() {
                // SAFETY: row r0 + i is inside the bounds-checked block.
                *v = unsafe { dot_row::<F32, W>(x, w.add((r0 + i) * ws), len) };
            }
            let sums = lane_sums(&v);
            for (i, &sum) in sums.iter().enumerate().take(n) {
                out.put(0, r0 + i, sum);
            }
            r0 += n;
        }
        return;
    }
    let mut t0 = 0;
    while t0 < block.n_tokens {
        let nt = (block.n_tokens - t0).min(4);
        // SAFETY (all pointer offsets below): stay within the bounds-checked block.
        let xt = unsafe { x.add(t0 * xs) };
        let mut r0 = 0;
        while r0 < block.n_rows {
            let nr = (block.n_rows - r0).min(4);
            let wr = unsafe { w.add(r0 * ws) };
            // SAFETY: tokens t0..t0+nt and rows r0..r0+nr are inside the block.
            let sums = unsafe {
                match (nt, nr) {
                    (4, 4) => tile::<W, 4, 4>(xt, xs, wr, ws, len),
                    (4, 3) => tile::<W, 4, 3>(xt, xs, wr, ws, len),
                    (4, 2) => tile::<W, 4, 2>(xt, xs, wr, ws, len),
                    (4, _) => tile::<W, 4, 1>(xt, xs, wr, ws, len),
                    (3, 4) => tile::<W, 3, 4>(xt, xs, wr, ws, len),
                    (3, 3) => tile::<W, 3, 3>(xt, xs, wr, ws, len),
                    (3, 2) => tile::<W, 3, 2>(xt, xs, wr, ws, len),
                    (3, _) => tile::<W, 3, 1>(xt, xs, wr, ws, len),
                    (2, 4) => tile::<W, 2, 4>(xt, xs, wr, ws, len),
                    (2, 3) => tile::<W, 2, 3>(xt, xs, wr, ws, len),
                    (2, 2) => tile::<W, 2, 2>(xt, xs, wr, ws, len),
                    (2, _) => tile::<W, 2, 1>(xt, xs, wr, ws, len),
                    (_, 4) => tile::<W, 1, 4>(xt, xs, wr, ws, len),
                    (_, 3) => tile::<W, 1, 3>(xt, xs, wr, ws, len),
                    (_, 2) => tile::<W, 1, 2>(xt, xs, wr, ws, len),
                    (_, _) => tile::<W, 1, 1>(xt, xs, wr, ws, len),
                }
            };
            for t in 0..nt {
                for r in 0..nr {
                    out.put(t0 + t, r0 + r, sums[4 * t + r]);
                }
            }
            r0 += nr;
        }
        t0 += nt;
    }
}

/// # Safety
/// AVX-512 F/BW/VL available; `src` holds `(n_rows - 1) * stride + len` elements and `dst`
/// at least `n_rows * len`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen<W: Widen>(
    src: &[W::Elem],
    stride: usize,
    n_rows: usize,
    len: usize,
    dst: &mut [f32],
) {
    for r in 0..n_rows {
        // SAFETY (the loop's pointer arithmetic): rows and columns stay within the contract.
        let s = unsafe { src.as_ptr().add(r * stride) };
        let d = unsafe { dst.as_mut_ptr().add(r * len) };
        let mut k = 0;
        while k + 16 <= len {
            unsafe { _mm512_storeu_ps(d.add(k), W::load(s.add(k))) };
            k += 16;
        }
        if k < len {
            let mask = lanes(len - k);
            unsafe { _mm512_mask_storeu_ps(d.add(k), mask, W::load_tail(s.add(k), mask)) };
        }
    }
}

/// Dot product over the common length of `a` and `b`.
///
/// # Safety
/// AVX-512 F/BW/VL available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut k = 0;
    // SAFETY (all loads): k + 32 <= n, k + 16 <= n, or masked to k..n.
    while k + 32 <= n {
        unsafe {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(k)), _mm512_loadu_ps(b.add(k)), acc0);
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.add(k + 16)),
                _mm512_loadu_ps(b.add(k + 16)),
                acc1,
            );
        }
        k += 32;
    }
    if k + 16 <= n {
        unsafe {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(k)), _mm512_loadu_ps(b.add(k)), acc0);
        }
        k += 16;
    }
    if k < n {
        let mask = lanes(n - k);
        unsafe {
            acc1 = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(mask, a.add(k)),
                _mm512_maskz_loadu_ps(mask, b.add(k)),
                acc1,
            );
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

/// `y += alpha * x` over the common length.
///
/// # Safety
/// AVX-512 F/BW/VL available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let (y, x) = (y.as_mut_ptr(), x.as_ptr());
    let a = _mm512_set1_ps(alpha);
    let mut k = 0;
    // SAFETY (all loads and stores): k + 16 <= n, or masked to k..n.
    while k + 16 <= n {
        unsafe {
            let v = _mm512_fmadd_ps(a, _mm512_loadu_ps(x.add(k)), _mm512_loadu_ps(y.add(k)));
            _mm512_storeu_ps(y.add(k), v);
        }
        k += 16;
    }
    if k < n {
        let mask = lanes(n - k);
        unsafe {
            let v = _mm512_fmadd_ps(
                a,
                _mm512_maskz_loadu_ps(mask, x.add(k)),
                _mm512_maskz_loadu_ps(mask, y.add(k)),
            );
            _mm512_mask_storeu_ps(y.add(k), mask, v);
        }
    }
}
