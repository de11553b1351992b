//! Element-wise math with AVX-512: a vectorised `exp`, and SwiGLU's `silu(gate) * up`.

use std::arch::x86_64::*;

use super::matmul::avx512::lanes;

/// Whether the CPU has AVX-512 F, BW and VL.
#[cfg(test)]
fn avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// `e^x` per lane; about 2 ulp. Below -104 it gives 0 and above 88.7 it gives infinity, as
/// the exact function rounds.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn exp(x: __m512) -> __m512 {
    // e^x = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2].
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let x = _mm512_min_ps(x, _mm512_set1_ps(89.0));
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

/// `gate[i] = gate[i] / (1 + e^-gate[i]) * up[i]` over the common length.
///
/// # Safety
/// AVX-512 F/BW/VL available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let mask = lanes((n - i).min(16));
        // SAFETY: the masked loads and store touch only elements i..n.
        unsafe {
            let gv = _mm512_maskz_loadu_ps(mask, g.add(i));
            let uv = _mm512_maskz_loadu_ps(mask, u.add(i));
            let denom = _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
            let silu = _mm512_div_ps(gv, denom);
            _mm512_mask_storeu_ps(g.add(i), mask, _mm512_mul_ps(silu, uv));
        }
        i += 16;
    }
}

/// `out[i] = e^(x[i]·scale − shift)` over the common length; 0 where that exponent is below
/// -104 or NaN.
///
/// # Safety
/// AVX-512 F/BW/VL available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn exp_affine(x: &[f32], scale: f32, shift: f32, out: &mut [f32]) {
    let n = x.len().min(out.len());
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let (scale, shift, floor) = (
        _mm512_set1_ps(scale),
        _mm512_set1_ps(shift),
        _mm512_set1_ps(-104.0),
    );
    let mut i = 0;
    while i < n {
        let mask = lanes((n - i).min(16));
        // SAFETY: the masked load and store touch only elements i..n.
        unsafe {
            let a = _mm512_sub_ps(
                _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, src.add(i)), scale),
                shift,
            );
            // Ordered compare: NaN lanes fail it, and get 0 as the small ones do.
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, floor);
            _mm512_mask_storeu_ps(dst.add(i), mask, _mm512_maskz_mov_ps(keep, exp(a)));
        }
        i += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        if !avx512() {
            return;
        }
        let mut worst = 0.0f64;
        let mut x = -110.0f32;
        while x <= 88.0 {
            let xs: Vec<f32> = (0..16)
                .map(|i| x + i as f32 * 0.0007)
                .map(|v| v.min(88.0))
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
