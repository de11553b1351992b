//! Portable kernels, for CPUs without AVX2 and for non-x86 targets. Written so the compiler
//! can vectorise them (eight independent partial sums), but otherwise plain Rust.

use super::{bf16_to_f32, Block, Kernels, OutBlock, WeightData};

/// The portable kernels; always available.
#[derive(Clone, Copy)]
pub(super) struct Scalar;

impl Kernels for Scalar {
    // One token per tile: several tokens go through the widened-panel schedule instead, so
    // bf16/f16 weights are converted once rather than once per token.
    const TOKENS: usize = 1;
    const ROWS: usize = 4;

    fn gemm(self, block: &Block, out: &OutBlock) {
        block.assert_in_bounds();
        let len = block.len;
        for t in 0..block.n_tokens {
            let x = &block.x[t * block.x_stride..][..len];
            for r in 0..block.n_rows {
                let start = r * block.w_stride;
                let sum = match block.w {
                    WeightData::F32(w) => dot_widened(x, &w[start..][..len], |v| v),
                    WeightData::Bf16(w) => dot_widened(x, &w[start..][..len], bf16_to_f32),
                    WeightData::F16(w) => dot_widened(x, &w[start..][..len], f16_to_f32),
                    WeightData::Quant(..) => unreachable!("quantized weights go through panels"),
                };
                out.put(t, r, sum);
            }
        }
    }

    fn widen(self, src: WeightData, stride: usize, n_rows: usize, len: usize, dst: &mut [f32]) {
        if let WeightData::Quant(..) = src {
            return super::dequant::widen_quant(src, stride, n_rows, len, dst);
        }
        for r in 0..n_rows {
            let d = &mut dst[r * len..][..len];
            let start = r * stride;
            match src {
                WeightData::F32(s) => d.copy_from_slice(&s[start..][..len]),
                WeightData::Bf16(s) => widen_into(d, &s[start..][..len], bf16_to_f32),
                WeightData::F16(s) => widen_into(d, &s[start..][..len], f16_to_f32),
                WeightData::Quant(..) => {}
            }
        }
    }
}

fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

fn widen_into<E: Copy>(dst: &mut [f32], src: &[E], f: impl Fn(E) -> f32) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(s);
    }
}

/// `sum x[k] * f(w[k])` with eight interleaved partial sums.
#[inline]
fn dot_widened<E: Copy>(x: &[f32], w: &[E], f: impl Fn(E) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, wc) = (x.chunks_exact(8), w.chunks_exact(8));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(wc.remainder())
        .map(|(&a, &b)| a * f(b))
        .sum();
    for (xs, ws) in xc.zip(wc) {
        for ((a, &xv), &wv) in acc.iter_mut().zip(xs).zip(ws) {
            *a += xv * f(wv);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product over the common length of `a` and `b`.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    dot_widened(&a[..n], &b[..n], |v| v)
}

/// `y += alpha * x` over the common length.
pub(super) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}
