//! One-token products with the activations rounded to f16 (`Numerics::Fast`, AVX-512): for
//! f16 weights, and for the down projection of bf16 weights.
//!
//! Why: a one-token product rereads the whole activation vector for every weight row, and
//! between two reads of an activation line the row's weights stream through L1 as well. With
//! f32 activations a 5632-wide input (TinyLlama's down projection) is 22 KiB, which with an
//! 11 KiB row no longer fits L1's 32 KiB; the activations were evicted row after row and the
//! product streamed at about 30 GB/s against 50 for the 2048-wide ones. In f16 the input is
//! half that and stays in L1. f16 keeps 11 significant bits (relative error at most 2^-11,
//! against bf16's 2^-8); inputs beyond f16's range are clamped to +-65504.
//!
//! Weights are widened to f32 in registers and multiplied with f32 FMAs; each task streams
//! its rows in memory order (as the f32 one-token path does).

use std::arch::x86_64::*;

use super::avx512::{dot_row, lane_sums, lanes, Avx512, Bf16, Widen, F16};
use super::{job_size, run_tasks, threads_for, OutPtr, Part, TaskSplit, ThreadPool, WeightData};

/// Largest finite f16.
const F16_MAX: f32 = 65504.0;

/// `dst[i]` = `src[i]` clamped to f16's range and rounded to f16 (nearest even).
pub(super) fn round(_cpu: Avx512, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: the token proves CPU support (AVX-512 F includes the f16 conversions);
    // lengths are equal (checked).
    unsafe { round_to_f16(src, dst) }
}

/// `out_p = w_p x` for every part `p` (f16 or bf16 weights, `x.len()` columns each).
pub(super) fn run(_cpu: Avx512, pool: &ThreadPool, x: &[u16], parts: &[Option<Part>]) {
    let (rows, work) = job_size(parts, 1);
    if rows == 0 {
        return;
    }
    let threads = threads_for(pool, work);
    let split = TaskSplit::guided(parts, threads, 16);
    run_tasks(pool, threads, parts, &split, |part, r0, r1| {
        let cols = part.w.cols;
        assert_eq!(cols, x.len());
        assert!(part.out.len >= part.w.rows);
        // SAFETY (both): the token proves CPU support; `w` holds rows * cols elements
        // (checked), `x` cols; tasks own disjoint rows of each part's output, which
        // outlives the product.
        match part.w.data {
            WeightData::F16(w) => {
                assert_eq!(w.len(), part.w.rows * cols);
                unsafe { stream_rows::<F16>(x, w.as_ptr(), part.out, r0, r1) }
            }
            WeightData::Bf16(w) => {
                assert_eq!(w.len(), part.w.rows * cols);
                unsafe { stream_rows::<Bf16>(x, w.as_ptr(), part.out, r0, r1) }
            }
            WeightData::F32(_) | WeightData::Quant(..) => {
                unreachable!("f32 and quantized weights never take f16 inputs")
            }
        }
    });
}

/// Rows `r0..r1`, in memory order; sixteen rows' vector sums are reduced together.
///
/// # Safety
/// AVX-512 F/BW/VL available; `w` holds `r1 * x.len()` elements; `out` holds at least `r1`
/// floats and no other thread touches `out[r0..r1]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn stream_rows<W: Widen<Elem = u16>>(
    x: &[u16],
    w: *const u16,
    out: OutPtr,
    r0: usize,
    r1: usize,
) {
    let cols = x.len();
    let mut r = r0;
    while r < r1 {
        let n = (r1 - r).min(16);
        let mut v = [_mm512_setzero_ps(); 16];
        for (i, v) in v.iter_mut().take(n).enumerate() {
            // SAFETY: row r + i < r1 is readable, and so is `x`.
            *v = unsafe { dot_row::<F16, W>(x.as_ptr(), w.add((r + i) * cols), cols) };
        }
        for (i, &value) in lane_sums(&v).iter().enumerate().take(n) {
            // SAFETY: r + i < r1 <= out.len; this task alone writes these rows.
            unsafe { *out.ptr.add(r + i) = value };
        }
        r += n;
    }
}

/// # Safety
/// AVX-512 F/BW/VL available; `dst` as long as `src`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn round_to_f16(src: &[f32], dst: &mut [u16]) {
    let n = src.len();
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let (lo, hi) = (_mm512_set1_ps(-F16_MAX), _mm512_set1_ps(F16_MAX));
    let mut i = 0;
    while i < n {
        let mask = lanes((n - i).min(16));
        // SAFETY: the masked load and store touch only elements i..n.
        unsafe {
            let v = _mm512_min_ps(_mm512_max_ps(_mm512_maskz_loadu_ps(mask, s.add(i)), lo), hi);
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_mask_storeu_epi16(d.add(i).cast(), mask, h);
        }
        i += 16;
    }
}
