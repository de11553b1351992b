//! AVX2 + FMA + F16C kernels: 8 f32 lanes, micro-kernel tiles of up to 4 tokens x 3 rows
//! (12 ymm accumulators, 3 weight vectors and one activation vector fill the 16 registers).
//! Column tails go through small zero-padded stack buffers.

use std::arch::x86_64::*;

use super::{Block, Kernels, OutBlock, WeightData};

/// Proof that the CPU supports AVX2, FMA and F16C.
#[derive(Clone, Copy)]
pub(super) struct Avx2(());

impl Avx2 {
    pub(super) fn new() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        ok.then_some(Avx2(()))
    }
}

impl Kernels for Avx2 {
    const TOKENS: usize = 4;
    const ROWS: usize = 3;

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

/// A stored weight dtype and how to widen 8 of its elements into a ymm of f32.
trait Widen {
    type Elem: Copy + Default;
    /// How many elements ahead to prefetch each weight row (0: none); see the AVX-512 kernels.
    const PREFETCH: usize;
    /// Loads `p[0..8]` as f32.
    unsafe fn load(p: *const Self::Elem) -> __m256;
}

struct F32;
struct Bf16;
struct F16;

impl Widen for F32 {
    type Elem = f32;
    const PREFETCH: usize = 0;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

impl Widen for Bf16 {
    type Elem = u16;
    const PREFETCH: usize = 512;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const u16) -> __m256 {
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
    }
}

impl Widen for F16 {
    type Elem = u16;
    const PREFETCH: usize = 512;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// Copies `p[0..n]` (`n < 8`) into a zero-padded buffer of 8.
///
/// # Safety
/// `p[0..n]` readable.
#[inline]
unsafe fn pad8<T: Copy + Default>(p: *const T, n: usize) -> [T; 8] {
    let mut buf = [T::default(); 8];
    // SAFETY: n < 8 fits the buffer; the caller vouches for the source.
    unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n) };
    buf
}

/// Lane `i` of the result is the sum of `v[i]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce4(v: [__m256; 4]) -> __m128 {
    let a = _mm256_hadd_ps(v[0], v[1]);
    let b = _mm256_hadd_ps(v[2], v[3]);
    let c = _mm256_hadd_ps(a, b);
    _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps::<1>(c))
}

/// One micro-kernel tile: returns `sums[4 * t + r] = sum_{k < len} x_t[k] * w_r[k]` with
/// `x_t = x + t * xs`, `w_r = w + r * ws`.
///
/// # Safety
/// AVX2/FMA/F16C available; `x_t[0..len]` and `w_r[0..len]` readable for `t < NT`, `r < NR`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops over the const-size register tile
unsafe fn tile<W: Widen, const NT: usize, const NR: usize>(
    x: *const f32,
    xs: usize,
    w: *const W::Elem,
    ws: usize,
    len: usize,
) -> [f32; 16] {
    let mut acc = [[_mm256_setzero_ps(); NR]; NT];
    let mut wv = [_mm256_setzero_ps(); NR];
    let mut k = 0;
    while k + 8 <= len {
        for r in 0..NR {
            // SAFETY: k + 8 <= len, so w_r[k..k + 8] is readable.
            wv[r] = unsafe { W::load(w.add(r * ws + k)) };
            // Once per 64-byte line of 16-bit weights.
            if W::PREFETCH > 0 && k % 32 == 0 {
                // A hint only: it never faults, so running past the row's end is harmless.
                let ahead = w.wrapping_add(r * ws + k + W::PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
        }
        for t in 0..NT {
            // SAFETY: as above, for x_t.
            let xv = unsafe { _mm256_loadu_ps(x.add(t * xs + k)) };
            for r in 0..NR {
                acc[t][r] = _mm256_fmadd_ps(xv, wv[r], acc[t][r]);
            }
        }
        k += 8;
    }
    if k < len {
        let n = len - k;
        for r in 0..NR {
            // SAFETY: w_r[k..len] is readable; the padded copy is 8 long.
            wv[r] = unsafe { W::load(pad8(w.add(r * ws + k), n).as_ptr()) };
        }
        for t in 0..NT {
            // SAFETY: as above, for x_t.
            let xv = unsafe { _mm256_loadu_ps(pad8(x.add(t * xs + k), n).as_ptr()) };
            for r in 0..NR {
                acc[t][r] = _mm256_fmadd_ps(xv, wv[r], acc[t][r]);
            }
        }
    }
    let mut sums = [0.0f32; 16];
    for t in 0..NT {
        let mut v = [_mm256_setzero_ps(); 4];
        v[..NR].copy_from_slice(&acc[t]);
        // SAFETY: sums[4t..4t + 4] is in bounds (t < 4).
        unsafe { _mm_storeu_ps(sums.as_mut_ptr().add(4 * t), reduce4(v)) };
    }
    sums
}

/// # Safety
/// AVX2/FMA/F16C available; `block` in bounds (`assert_in_bounds`), `w` is `block.w`'s slice.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm<W: Widen>(block: &Block, w: &[W::Elem], out: &OutBlock) {
    let (x, xs, ws, len) = (block.x.as_ptr(), block.x_stride, block.w_stride, block.len);
    let w = w.as_ptr();
    let mut t0 = 0;
    while t0 < block.n_tokens {
        let nt = (block.n_tokens - t0).min(4);
        // SAFETY (all pointer offsets below): stay within the bounds-checked block.
        let xt = unsafe { x.add(t0 * xs) };
        let mut r0 = 0;
        while r0 < block.n_rows {
            let nr = (block.n_rows - r0).min(3);
            let wr = unsafe { w.add(r0 * ws) };
            // SAFETY: tokens t0..t0+nt and rows r0..r0+nr are inside the block.
            let sums = unsafe {
                match (nt, nr) {
                    (4, 3) => tile::<W, 4, 3>(xt, xs, wr, ws, len),
                    (4, 2) => tile::<W, 4, 2>(xt, xs, wr, ws, len),
                    (4, _) => tile::<W, 4, 1>(xt, xs, wr, ws, len),
                    (3, 3) => tile::<W, 3, 3>(xt, xs, wr, ws, len),
                    (3, 2) => tile::<W, 3, 2>(xt, xs, wr, ws, len),
                    (3, _) => tile::<W, 3, 1>(xt, xs, wr, ws, len),
                    (2, 3) => tile::<W, 2, 3>(xt, xs, wr, ws, len),
                    (2, 2) => tile::<W, 2, 2>(xt, xs, wr, ws, len),
                    (2, _) => tile::<W, 2, 1>(xt, xs, wr, ws, len),
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
/// AVX2/FMA/F16C available; `src` holds `(n_rows - 1) * stride + len` elements and `dst` at
/// least `n_rows * len`.
#[target_feature(enable = "avx2,fma,f16c")]
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
        while k + 8 <= len {
            unsafe { _mm256_storeu_ps(d.add(k), W::load(s.add(k))) };
            k += 8;
        }
        if k < len {
            let n = len - k;
            let mut buf = [0.0f32; 8];
            unsafe {
                _mm256_storeu_ps(buf.as_mut_ptr(), W::load(pad8(s.add(k), n).as_ptr()));
                std::ptr::copy_nonoverlapping(buf.as_ptr(), d.add(k), n);
            }
        }
    }
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Dot product over the common length of `a` and `b`.
///
/// # Safety
/// AVX2 and FMA available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut k = 0;
    // SAFETY (all loads): k + 16 <= n or k + 8 <= n.
    while k + 16 <= n {
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(k)), _mm256_loadu_ps(pb.add(k)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(k + 8)),
                _mm256_loadu_ps(pb.add(k + 8)),
                acc1,
            );
        }
        k += 16;
    }
    if k + 8 <= n {
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(k)), _mm256_loadu_ps(pb.add(k)), acc0);
        }
        k += 8;
    }
    let tail: f32 = a[k..n].iter().zip(&b[k..n]).map(|(x, y)| x * y).sum();
    hsum(_mm256_add_ps(acc0, acc1)) + tail
}

/// `y += alpha * x` over the common length.
///
/// # Safety
/// AVX2 and FMA available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let a = _mm256_set1_ps(alpha);
    let mut k = 0;
    while k + 8 <= n {
        // SAFETY: k + 8 <= n.
        unsafe {
            let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(k)), _mm256_loadu_ps(py.add(k)));
            _mm256_storeu_ps(py.add(k), v);
        }
        k += 8;
    }
    for (yv, xv) in y[k..n].iter_mut().zip(&x[k..n]) {
        *yv = alpha.mul_add(*xv, *yv);
    }
}
