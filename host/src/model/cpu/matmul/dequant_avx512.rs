//! AVX-512 dequantization of GGML blocks to f32 (the layouts are in `model::quant`). Every
//! value is computed with the same operations, in the same order, as the portable reference
//! (`quant::dequantize_scalar`), so the two agree bit for bit.

use std::arch::x86_64::*;

use super::avx512::Avx512;
use crate::model::quant::{q4k_scale_min, QuantType};

/// Dequantizes whole blocks (`out.len()` = blocks × block elements).
pub(super) fn dequantize(_cpu: Avx512, qt: QuantType, blocks: &[u8], out: &mut [f32]) {
    let (be, bb) = (qt.block_elems(), qt.block_bytes());
    assert_eq!(blocks.len() % bb, 0);
    assert_eq!(out.len(), blocks.len() / bb * be);
    for (b, y) in blocks.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        // SAFETY: the token proves CPU support; `b` is one whole block and `y` its
        // `be` outputs (the chunk sizes guarantee both).
        unsafe {
            match qt {
                QuantType::Q8_0 => q8_0(b, y),
                QuantType::Q4_0 => q4_5(b, y, None, false),
                QuantType::Q4_1 => q4_5(b, y, Some(f16_at(&b[2..])), false),
                QuantType::Q5_0 => q4_5(b, y, None, true),
                QuantType::Q5_1 => q4_5(b, y, Some(f16_at(&b[2..])), true),
                QuantType::Q4K => q4_k(b, y),
                QuantType::Q6K => q6_k(b, y),
            }
        }
    }
}

/// The f16 stored little-endian at `b[0..2]`, converted by the hardware (`half`'s portable
/// conversion costs more than dequantizing the rest of a 32-element block).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn f16_at(b: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([b[0], b[1]]);
    _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16(bits as i16)))
}

/// 16 bytes at `p` as 16 unsigned i32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn u8x16(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 16 readable bytes.
    _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) })
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q8_0 block, `y` 32 floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = _mm512_set1_ps(f16_at(b));
    for h in 0..2 {
        // SAFETY: bytes 2 + 16h .. 18 + 16h and floats 16h .. 16h + 16 are in the block.
        unsafe {
            let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.as_ptr().add(2 + 16 * h).cast()));
            _mm512_storeu_ps(
                y.as_mut_ptr().add(16 * h),
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(q)),
            );
        }
    }
}

/// Q4_0, Q4_1 (`m` given), Q5_0 and Q5_1 (`five`).
///
/// # Safety
/// AVX-512 F/BW/VL; `b` one block of that type, `y` 32 floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q4_5(b: &[u8], y: &mut [f32], m: Option<f32>, five: bool) {
    let d = _mm512_set1_ps(f16_at(b));
    let rest = if m.is_some() { &b[4..] } else { &b[2..] };
    let (qh, qs) = if five {
        (
            u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]),
            &rest[4..20],
        )
    } else {
        (0, &rest[..16])
    };
    // SAFETY: `qs` holds 16 bytes.
    let bytes = unsafe { u8x16(qs.as_ptr()) };
    let low = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0f));
    let high = _mm512_srli_epi32::<4>(bytes);
    let sixteen = _mm512_set1_epi32(16);
    let centre = _mm512_set1_epi32(if five { 16 } else { 8 });
    for (h, (q, bits)) in [(low, qh as u16), (high, (qh >> 16) as u16)]
        .into_iter()
        .enumerate()
    {
        let q = if five {
            _mm512_or_si512(q, _mm512_maskz_mov_epi32(bits, sixteen))
        } else {
            q
        };
        let v = match m {
            Some(m) => _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d), _mm512_set1_ps(m)),
            None => _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, centre)), d),
        };
        // SAFETY: floats 16h .. 16h + 16 of the block's 32.
        unsafe { _mm512_storeu_ps(y.as_mut_ptr().add(16 * h), v) };
    }
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q4_K block, `y` 256 floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
    let scales = &b[4..16];
    let mask = _mm512_set1_epi32(0x0f);
    for c in 0..4 {
        let (s1, m1) = q4k_scale_min(2 * c, scales);
        let (s2, m2) = q4k_scale_min(2 * c + 1, scales);
        let subs = [
            (d * f32::from(s1), dmin * f32::from(m1), false),
            (d * f32::from(s2), dmin * f32::from(m2), true),
        ];
        for (s, (scale, min, high)) in subs.into_iter().enumerate() {
            let (scale, min) = (_mm512_set1_ps(scale), _mm512_set1_ps(min));
            for h in 0..2 {
                // SAFETY: bytes 16 + 32c + 16h .. +16 lie in the block's 128 nibble bytes;
                // floats 64c + 32s + 16h .. +16 in its 256 outputs.
                unsafe {
                    let bytes = u8x16(b.as_ptr().add(16 + 32 * c + 16 * h));
                    let q = if high {
                        _mm512_srli_epi32::<4>(bytes)
                    } else {
                        _mm512_and_si512(bytes, mask)
                    };
                    let v = _mm512_sub_ps(_mm512_mul_ps(scale, _mm512_cvtepi32_ps(q)), min);
                    _mm512_storeu_ps(y.as_mut_ptr().add(64 * c + 32 * s + 16 * h), v);
                }
            }
        }
    }
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q6_K block, `y` 256 floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(&b[208..]);
    let (nib, two, off) = (
        _mm512_set1_epi32(0x0f),
        _mm512_set1_epi32(3),
        _mm512_set1_epi32(32),
    );
    let p = b.as_ptr();
    for half in 0..2 {
        for chunk in 0..2 {
            let l = 16 * chunk;
            // SAFETY: ql bytes 64·half + l (+32) .. +16, qh bytes 128 + 32·half + l .. +16
            // are inside the block's 210 bytes.
            let (ql0, ql1, qh) = unsafe {
                (
                    u8x16(p.add(64 * half + l)),
                    u8x16(p.add(64 * half + l + 32)),
                    u8x16(p.add(128 + 32 * half + l)),
                )
            };
            let bits = |shift: u32| {
                _mm512_slli_epi32::<4>(_mm512_and_si512(
                    _mm512_srlv_epi32(qh, _mm512_set1_epi32(shift as i32)),
                    two,
                ))
            };
            let quads = [
                _mm512_or_si512(_mm512_and_si512(ql0, nib), bits(0)),
                _mm512_or_si512(_mm512_and_si512(ql1, nib), bits(2)),
                _mm512_or_si512(_mm512_srli_epi32::<4>(ql0), bits(4)),
                _mm512_or_si512(_mm512_srli_epi32::<4>(ql1), bits(6)),
            ];
            for (k, q) in quads.into_iter().enumerate() {
                let sc = b[192 + 8 * half + chunk + 2 * k] as i8;
                let scale = _mm512_set1_ps(d * f32::from(sc));
                let v = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(q, off)));
                // SAFETY: floats 128·half + 32k + l .. +16 of the block's 256.
                unsafe { _mm512_storeu_ps(y.as_mut_ptr().add(128 * half + 32 * k + l), v) };
            }
        }
    }
}

/// One quantized type's block, for the kernels generic over it.
trait Block {
    const ELEMS: usize;
    const BYTES: usize;
    /// # Safety
    /// AVX-512 F/BW/VL; `b` one block, `y` `ELEMS` floats.
    unsafe fn dequant(b: &[u8], y: &mut [f32]);
}

macro_rules! block_type {
    ($name:ident, $elems:expr, $bytes:expr, |$b:ident, $y:ident| $body:expr) => {
        struct $name;
        impl Block for $name {
            const ELEMS: usize = $elems;
            const BYTES: usize = $bytes;
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn dequant($b: &[u8], $y: &mut [f32]) {
                // SAFETY: as the trait requires.
                unsafe { $body }
            }
        }
    };
}

block_type!(BQ8_0, 32, 34, |b, y| q8_0(b, y));
block_type!(BQ4_0, 32, 18, |b, y| q4_5(b, y, None, false));
block_type!(BQ4_1, 32, 20, |b, y| q4_5(
    b,
    y,
    Some(f16_at(&b[2..])),
    false
));
block_type!(BQ5_0, 32, 22, |b, y| q4_5(b, y, None, true));
block_type!(BQ5_1, 32, 24, |b, y| q4_5(
    b,
    y,
    Some(f16_at(&b[2..])),
    true
));
block_type!(BQ4K, 256, 144, |b, y| q4_k(b, y));
block_type!(BQ6K, 256, 210, |b, y| q6_k(b, y));

/// Most tokens [`few_tokens`] takes at once.
pub(super) const FEW_TOKENS: usize = 4;

/// `out[t * out_rows + r] = sum_k x[t * cols + k] * w[r, k]` for rows `r0..r1` and tokens
/// `t < n` (at most [`FEW_TOKENS`]): each block is dequantized into a buffer that stays in L1
/// and multiplied with every token at once, rows in memory order (one sequential stream), and
/// sixteen rows' sums reduced together. For decode, where the panel schedule's bookkeeping
/// costs more than the arithmetic.
#[allow(clippy::too_many_arguments)]
pub(super) fn few_tokens(
    _cpu: Avx512,
    qt: QuantType,
    w: &[u8],
    cols: usize,
    x: &[f32],
    n: usize,
    rows: std::ops::Range<usize>,
    out: super::OutPtr,
    out_rows: usize,
) {
    assert!(n <= FEW_TOKENS && x.len() >= n * cols);
    assert!(w.len() >= qt.bytes_for(rows.end * cols));
    assert!(n == 0 || (n - 1) * out_rows + rows.end <= out.len);
    // SAFETY: the token proves CPU support; the reads and writes are in bounds (checked).
    unsafe {
        match qt {
            QuantType::Q8_0 => few::<BQ8_0>(w, cols, x, n, rows, out, out_rows),
            QuantType::Q4_0 => few::<BQ4_0>(w, cols, x, n, rows, out, out_rows),
            QuantType::Q4_1 => few::<BQ4_1>(w, cols, x, n, rows, out, out_rows),
            QuantType::Q5_0 => few::<BQ5_0>(w, cols, x, n, rows, out, out_rows),
            QuantType::Q5_1 => few::<BQ5_1>(w, cols, x, n, rows, out, out_rows),
            QuantType::Q4K => few::<BQ4K>(w, cols, x, n, rows, out, out_rows),
            QuantType::Q6K => few::<BQ6K>(w, cols, x, n, rows, out, out_rows),
        }
    }
}

/// # Safety
/// As [`few_tokens`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::needless_range_loop)] // index loops over the per-token accumulators
unsafe fn few<B: Block>(
    w: &[u8],
    cols: usize,
    x: &[f32],
    n: usize,
    rows: std::ops::Range<usize>,
    out: super::OutPtr,
    out_rows: usize,
) {
    let row_bytes = cols / B::ELEMS * B::BYTES;
    let mut buf = [0.0f32; 256];
    let mut r = rows.start;
    while r < rows.end {
        let g = (rows.end - r).min(16);
        let mut v = [[_mm512_setzero_ps(); 16]; FEW_TOKENS];
        for i in 0..g {
            let row = &w[(r + i) * row_bytes..][..row_bytes];
            // Four accumulators per token, so the multiply-adds' latency never limits.
            let mut acc = [[_mm512_setzero_ps(); 4]; FEW_TOKENS];
            for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
                // SAFETY: one whole block into the buffer's first ELEMS floats.
                unsafe { B::dequant(block, &mut buf[..B::ELEMS]) };
                let k0 = b * B::ELEMS;
                for t in 0..n {
                    let xt = &x[t * cols + k0..][..B::ELEMS];
                    for j in 0..B::ELEMS / 16 {
                        // SAFETY: 16 floats at 16j of both the buffer and this token's slice.
                        let (xv, wv) = unsafe {
                            (
                                _mm512_loadu_ps(xt.as_ptr().add(16 * j)),
                                _mm512_loadu_ps(buf.as_ptr().add(16 * j)),
                            )
                        };
                        acc[t][j % 4] = _mm512_fmadd_ps(xv, wv, acc[t][j % 4]);
                    }
                }
            }
            for t in 0..n {
                let a = &acc[t];
                v[t][i] = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            }
        }
        for t in 0..n {
            for (i, &value) in super::avx512::lane_sums(&v[t]).iter().enumerate().take(g) {
                // SAFETY: t * out_rows + r + i < out.len (checked by the caller); the caller's
                // task alone writes these rows.
                unsafe { *out.ptr.add(t * out_rows + r + i) = value };
            }
        }
        r += g;
    }
}
