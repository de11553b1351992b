//! Element-wise pieces of the forward pass, computed in f32 the way HF transformers does.

/// `out = weight * (x * rsqrt(mean(x²) + eps))` (HF `LlamaRMSNorm`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // Sixteen running sums, one per lane, so the compiler can vectorise the sum (one serial
    // chain cannot be reordered); they are added up once at the end.
    let mut lanes = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        for (acc, v) in lanes.iter_mut().zip(chunk) {
            *acc += v * v;
        }
    }
    let sum_sq = lanes.iter().sum::<f32>() + tail;
    let inv = 1.0 / (sum_sq / x.len() as f32 + eps).sqrt();
    for ((o, &xv), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (xv * inv);
    }
}

/// `gate = silu(gate) * up`, in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::matmul::Isa::detect() == super::matmul::Isa::Avx512 {
        // SAFETY: `detect` saw the CPU support AVX-512 F/BW/VL.
        return unsafe { super::vector_math::silu_mul(gate, up) };
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        let silu = *g / (1.0 + (-*g).exp());
        *g = silu * u;
    }
}

/// `out[i] = e^(x[i]·scale − shift)` over the common length; 0 where that exponent is below
/// -104 (e^-104 is below f32's smallest normal) or NaN. The sampler's token weights: `scale`
/// is the inverse temperature, `shift` the largest scaled logit.
pub fn exp_affine(x: &[f32], scale: f32, shift: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::matmul::Isa::detect() == super::matmul::Isa::Avx512 {
        // SAFETY: `detect` saw the CPU support AVX-512 F/BW/VL.
        return unsafe { super::vector_math::exp_affine(x, scale, shift, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        let a = v * scale - shift;
        *o = if a >= -104.0 { a.exp() } else { 0.0 };
    }
}

/// Adds `bias` to every row of `rows` (`rows.len()` a multiple of `bias.len()`).
pub fn add_bias(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// HF's rotate_half RoPE on one head: the first and second halves of `head` are the pairs.
pub fn apply_rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_affine_matches_f64_and_zeroes_what_underflows() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 300.0).collect();
        let (scale, shift) = (0.8f32, -20.0f32);
        let mut out = vec![-1.0f32; 1003];
        exp_affine(&x, scale, shift, &mut out);
        for (&v, &o) in x.iter().zip(&out) {
            let a = v * scale - shift;
            if a < -104.0 {
                assert_eq!(o, 0.0, "e^{a}");
            } else if a > -80.0 {
                let want = (a as f64).exp();
                assert!(
                    ((o as f64 - want) / want).abs() < 1e-6,
                    "e^{a} = {o}, not {want}"
                );
            }
        }
        assert_eq!(out[1000..], [-1.0; 3], "nothing written past the input");
        let mut out = [1.0f32; 3];
        exp_affine(&[f32::NAN, 0.0, f32::NEG_INFINITY], 1.0, 0.0, &mut out);
        assert_eq!(out, [0.0, 1.0, 0.0]);
    }

    #[test]
    fn rope_rotates_pairs_across_halves() {
        let mut head = [1.0, 2.0, 3.0, 4.0];
        let (c, s) = (0.6f32, 0.8f32);
        apply_rope(&mut head, &[c, 1.0], &[s, 0.0]);
        assert!((head[0] - (1.0 * c - 3.0 * s)).abs() < 1e-6);
        assert!((head[2] - (3.0 * c + 1.0 * s)).abs() < 1e-6);
        assert_eq!((head[1], head[3]), (2.0, 4.0));
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_values() {
        let mut x = [1000.0, 1001.0, 999.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }

    #[test]
    fn rms_norm_of_a_long_row_matches_f64() {
        // 37 = two 16-lane chunks and a tail of 5.
        let x: Vec<f32> = (0..37).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..37).map(|i| 0.5 + i as f32 / 37.0).collect();
        let mut out = vec![0.0; 37];
        rms_norm(&x, &w, 1e-5, &mut out);
        let mean: f64 = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / 37.0;
        let inv = 1.0 / (mean + 1e-5).sqrt();
        for i in 0..37 {
            let want = w[i] as f64 * x[i] as f64 * inv;
            assert!(
                (out[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                out[i]
            );
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0, -2.0, 3.0, -4.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
        let rms = (30.0f32 / 4.0).sqrt();
        assert!((out[1] - 2.0 * -2.0 / rms).abs() < 1e-6);
    }
}
