//! AVX-512 dequantization of GGML blocks to f32 (the layouts are in `model::quant`), and the
//! few-token products that multiply the dequantized vectors straight away. Every value equals
//! the portable reference's (`quant::dequantize_scalar`): the same operations in the same
//! order, or a fused multiply-add whose one rounding is of the same exact value (a zero may
//! come out with the other sign).

use std::arch::x86_64::*;

use super::avx512::Avx512;
use crate::model::quant::{iq4xs_scale, q3k_scale, q4k_scale_min, QuantType, IQ4_VALUES};

/// The f16 stored little-endian at `b[0..2]`, converted by the hardware (`half`'s portable
/// conversion costs more than dequantizing the rest of a 32-element block).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn f16_at(b: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([b[0], b[1]]);
    _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16(bits as i16)))
}

/// Where a block's dequantized vectors go: `put(i, v)` receives elements `i..i + 16`.
trait Sink {
    /// # Safety
    /// AVX-512 F/BW/VL; `i + 16` at most the block's element count.
    unsafe fn put(&mut self, i: usize, v: __m512);
}

/// Stores the elements into a slice of the block's length.
struct Store<'a>(&'a mut [f32]);

impl Sink for Store<'_> {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn put(&mut self, i: usize, v: __m512) {
        assert!(i + 16 <= self.0.len());
        // SAFETY: in bounds (checked).
        unsafe { _mm512_storeu_ps(self.0.as_mut_ptr().add(i), v) }
    }
}

/// Multiplies the elements with `N` (at most [`FEW_TOKENS`]) tokens' activations at once:
/// token `t`'s block of activations starts at `x + t * stride`; four accumulators per token.
struct Dot<'a, const N: usize> {
    x: *const f32,
    stride: usize,
    acc: &'a mut [[__m512; 4]; N],
}

impl<const N: usize> Sink for Dot<'_, N> {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn put(&mut self, i: usize, v: __m512) {
        let a = (i / 16) % 4;
        for t in 0..N {
            // SAFETY: the caller made `x + t * stride` the start of token t's activations
            // for this block, which has at least i + 16 elements.
            let xv = unsafe { _mm512_loadu_ps(self.x.add(t * self.stride + i)) };
            self.acc[t][a] = _mm512_fmadd_ps(xv, v, self.acc[t][a]);
        }
    }
}

/// [`f16_at`] in every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn f16_splat(b: &[u8]) -> __m512 {
    _mm512_cvtph_ps(_mm256_set1_epi16(u16::from_le_bytes([b[0], b[1]]) as i16))
}

/// 16 bytes at `p` as 16 unsigned i32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn u8x16(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 16 readable bytes.
    _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) })
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q8_0 block; `y` takes its 32 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q8_0(b: &[u8], y: &mut impl Sink) {
    let d = f16_splat(b);
    for h in 0..2 {
        // SAFETY: bytes 2 + 16h .. 18 + 16h and floats 16h .. 16h + 16 are in the block.
        unsafe {
            let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.as_ptr().add(2 + 16 * h).cast()));
            y.put(16 * h, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q)));
        }
    }
}

/// Q4_0, Q4_1 (`m` given), Q5_0 and Q5_1 (`five`).
///
/// # Safety
/// AVX-512 F/BW/VL; `b` one block of that type; `y` takes its 32 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q4_5(b: &[u8], y: &mut impl Sink, m: Option<f32>, five: bool) {
    let d = f16_splat(b);
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
    // (q - c)·d as one fused multiply-add q·d + (-c·d): -c·d is exact (c is a power of two)
    // and so is q·d - c·d before the one rounding, so the value is the reference's.
    let offset = _mm512_mul_ps(d, _mm512_set1_ps(if five { -16.0 } else { -8.0 }));
    for (h, (q, bits)) in [(low, qh as u16), (high, (qh >> 16) as u16)]
        .into_iter()
        .enumerate()
    {
        let q = if five {
            _mm512_mask_add_epi32(q, bits, q, sixteen)
        } else {
            q
        };
        let v = match m {
            Some(m) => _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d), _mm512_set1_ps(m)),
            None => _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, offset),
        };
        // SAFETY: floats 16h .. 16h + 16 of the block's 32.
        unsafe { y.put(16 * h, v) };
    }
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q4_K block; `y` takes its 256 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q4_k(b: &[u8], y: &mut impl Sink) {
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
                    y.put(64 * c + 32 * s + 16 * h, v);
                }
            }
        }
    }
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q6_K block; `y` takes its 256 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q6_k(b: &[u8], y: &mut impl Sink) {
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
                unsafe { y.put(128 * half + 32 * k + l, v) };
            }
        }
    }
}

/// 2-bit fields of 16 quant bytes at `p`: bits `shift..shift + 2` of each, as i32 lanes.
///
/// # Safety
/// AVX-512 F/BW/VL; 16 readable bytes at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn two_bits(p: *const u8, shift: u32) -> __m512i {
    // SAFETY: as the caller guarantees.
    let bytes = unsafe { u8x16(p) };
    _mm512_and_si512(
        _mm512_srlv_epi32(bytes, _mm512_set1_epi32(shift as i32)),
        _mm512_set1_epi32(3),
    )
}

/// Lanes whose byte (of 16 at `p`) has bit `bit` set.
///
/// # Safety
/// AVX-512 F/BW/VL; 16 readable bytes at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn bit_set(p: *const u8, bit: usize) -> __mmask16 {
    // SAFETY: as the caller guarantees.
    let bytes = unsafe { u8x16(p) };
    _mm512_test_epi32_mask(bytes, _mm512_set1_epi32(1 << bit))
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q2_K block; `y` takes its 256 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q2_k(b: &[u8], y: &mut impl Sink) {
    let (d, dmin) = (f16_at(&b[80..]), f16_at(&b[82..]));
    // Sixteen elements `e..e + 16` share scale byte `e / 16` and quant bytes `16 + 32n + l`.
    for e in (0..256).step_by(16) {
        let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
        let sc = b[e / 16];
        let dl = _mm512_set1_ps(d * f32::from(sc & 0x0f));
        let ml = _mm512_set1_ps(dmin * f32::from(sc >> 4));
        // SAFETY: quant bytes 16 + 32n + l .. +16 lie in the block's 84; floats e .. e + 16
        // in its 256.
        unsafe {
            let q = two_bits(b.as_ptr().add(16 + 32 * n + l), 2 * j as u32);
            y.put(
                e,
                _mm512_sub_ps(_mm512_mul_ps(dl, _mm512_cvtepi32_ps(q)), ml),
            );
        }
    }
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q3_K block; `y` takes its 256 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q3_k(b: &[u8], y: &mut impl Sink) {
    let d = f16_at(&b[108..]);
    let scales = &b[96..108];
    let four = _mm512_set1_epi32(4);
    for e in (0..256).step_by(16) {
        let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
        let dl = _mm512_set1_ps(d * (i32::from(q3k_scale(e / 16, scales)) - 32) as f32);
        // SAFETY: quant bytes 32 + 32n + l .. +16 and mask bytes l .. l + 16 lie in the
        // block's 110; floats e .. e + 16 in its 256.
        unsafe {
            let q = two_bits(b.as_ptr().add(32 + 32 * n + l), 2 * j as u32);
            let high = bit_set(b.as_ptr().add(l), e / 32);
            // Minus 4 where the high bit is clear.
            let q = _mm512_mask_sub_epi32(q, !high, q, four);
            y.put(e, _mm512_mul_ps(dl, _mm512_cvtepi32_ps(q)));
        }
    }
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one Q5_K block; `y` takes its 256 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q5_k(b: &[u8], y: &mut impl Sink) {
    let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
    let scales = &b[4..16];
    let (mask, sixteen) = (_mm512_set1_epi32(0x0f), _mm512_set1_epi32(16));
    for e in (0..256).step_by(16) {
        let (c, l) = (e / 64, e % 32);
        let (sc, m) = q4k_scale_min(e / 32, scales);
        let scale = _mm512_set1_ps(d * f32::from(sc));
        let min = _mm512_set1_ps(dmin * f32::from(m));
        // SAFETY: nibble bytes 48 + 32c + l .. +16 and fifth-bit bytes 16 + l .. +16 lie in
        // the block's 176; floats e .. e + 16 in its 256.
        unsafe {
            let bytes = u8x16(b.as_ptr().add(48 + 32 * c + l));
            let q = if e % 64 >= 32 {
                _mm512_srli_epi32::<4>(bytes)
            } else {
                _mm512_and_si512(bytes, mask)
            };
            let fifth = bit_set(b.as_ptr().add(16 + l), e / 32);
            let q = _mm512_mask_add_epi32(q, fifth, q, sixteen);
            y.put(
                e,
                _mm512_sub_ps(_mm512_mul_ps(scale, _mm512_cvtepi32_ps(q)), min),
            );
        }
    }
}

/// [`IQ4_VALUES`] as 16 f32 lanes, for a lookup by nibble.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn iq4_table() -> __m512 {
    // SAFETY: IQ4_VALUES is 16 readable bytes.
    let bytes = unsafe { _mm_loadu_si128(IQ4_VALUES.as_ptr().cast()) };
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))
}

/// 32 elements of an IQ4 sub-block: scale `d`, 16 nibble bytes at `p`, into `y` at `at`.
///
/// # Safety
/// AVX-512 F/BW/VL; 16 readable bytes at `p`; `at + 32` at most the block's element count.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn iq4_run(d: __m512, p: *const u8, table: __m512, y: &mut impl Sink, at: usize) {
    // SAFETY: as the caller guarantees.
    let bytes = unsafe { u8x16(p) };
    // The lookup reads each lane's low 4 bits, so the high nibble needs no mask.
    let low = _mm512_permutexvar_ps(bytes, table);
    let high = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table);
    // SAFETY: as the caller guarantees.
    unsafe {
        y.put(at, _mm512_mul_ps(d, low));
        y.put(at + 16, _mm512_mul_ps(d, high));
    }
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one IQ4_NL block; `y` takes its 32 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn iq4_nl(b: &[u8], y: &mut impl Sink) {
    // SAFETY: nibble bytes 2..18 of the block's 18; floats 0..32.
    unsafe { iq4_run(f16_splat(b), b.as_ptr().add(2), iq4_table(), y, 0) }
}

/// # Safety
/// AVX-512 F/BW/VL; `b` one IQ4_XS block; `y` takes its 256 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn iq4_xs(b: &[u8], y: &mut impl Sink) {
    let d = f16_at(b);
    let high = u16::from_le_bytes([b[2], b[3]]);
    let table = iq4_table();
    for s in 0..8 {
        let dl = d * (i32::from(iq4xs_scale(s, high, &b[4..8])) - 32) as f32;
        // SAFETY: nibble bytes 8 + 16s .. +16 of the block's 136; floats 32s .. 32s + 32.
        unsafe {
            iq4_run(
                _mm512_set1_ps(dl),
                b.as_ptr().add(8 + 16 * s),
                table,
                y,
                32 * s,
            )
        }
    }
}

/// One quantized type's block, for the kernels generic over it.
trait Block {
    const ELEMS: usize;
    const BYTES: usize;
    /// # Safety
    /// AVX-512 F/BW/VL; `b` one block; `y` takes `ELEMS` elements.
    unsafe fn dequant(b: &[u8], y: &mut impl Sink);
}

macro_rules! block_type {
    ($name:ident, $qt:expr, |$b:ident, $y:ident| $body:expr) => {
        struct $name;
        impl Block for $name {
            const ELEMS: usize = $qt.block_elems();
            const BYTES: usize = $qt.block_bytes();
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn dequant($b: &[u8], $y: &mut impl Sink) {
                // SAFETY: as the trait requires.
                unsafe { $body }
            }
        }
    };
}

block_type!(BQ8_0, QuantType::Q8_0, |b, y| q8_0(b, y));
block_type!(BQ4_0, QuantType::Q4_0, |b, y| q4_5(b, y, None, false));
block_type!(BQ4_1, QuantType::Q4_1, |b, y| {
    q4_5(b, y, Some(f16_at(&b[2..])), false)
});
block_type!(BQ5_0, QuantType::Q5_0, |b, y| q4_5(b, y, None, true));
block_type!(BQ5_1, QuantType::Q5_1, |b, y| {
    q4_5(b, y, Some(f16_at(&b[2..])), true)
});
block_type!(BQ4K, QuantType::Q4K, |b, y| q4_k(b, y));
block_type!(BQ6K, QuantType::Q6K, |b, y| q6_k(b, y));
block_type!(BQ2K, QuantType::Q2K, |b, y| q2_k(b, y));
block_type!(BQ3K, QuantType::Q3K, |b, y| q3_k(b, y));
block_type!(BQ5K, QuantType::Q5K, |b, y| q5_k(b, y));
block_type!(BIq4Nl, QuantType::Iq4Nl, |b, y| iq4_nl(b, y));
block_type!(BIq4Xs, QuantType::Iq4Xs, |b, y| iq4_xs(b, y));

/// `$body` with `$B` naming the [`Block`] type of quantized type `$qt`.
macro_rules! with_block {
    ($qt:expr, $B:ident => $body:expr) => {
        match $qt {
            QuantType::Q8_0 => {
                type $B = BQ8_0;
                $body
            }
            QuantType::Q4_0 => {
                type $B = BQ4_0;
                $body
            }
            QuantType::Q4_1 => {
                type $B = BQ4_1;
                $body
            }
            QuantType::Q5_0 => {
                type $B = BQ5_0;
                $body
            }
            QuantType::Q5_1 => {
                type $B = BQ5_1;
                $body
            }
            QuantType::Q4K => {
                type $B = BQ4K;
                $body
            }
            QuantType::Q6K => {
                type $B = BQ6K;
                $body
            }
            QuantType::Q2K => {
                type $B = BQ2K;
                $body
            }
            QuantType::Q3K => {
                type $B = BQ3K;
                $body
            }
            QuantType::Q5K => {
                type $B = BQ5K;
                $body
            }
            QuantType::Iq4Nl => {
                type $B = BIq4Nl;
                $body
            }
            QuantType::Iq4Xs => {
                type $B = BIq4Xs;
                $body
            }
        }
    };
}

/// Dequantizes whole blocks (`out.len()` = blocks × block elements).
pub(super) fn dequantize(_cpu: Avx512, qt: QuantType, blocks: &[u8], out: &mut [f32]) {
    let (be, bb) = (qt.block_elems(), qt.block_bytes());
    assert_eq!(blocks.len() % bb, 0);
    assert_eq!(out.len(), blocks.len() / bb * be);
    // SAFETY: the token proves CPU support; the lengths match (checked).
    unsafe { with_block!(qt, B => dequantize_blocks::<B>(blocks, out)) }
}

/// # Safety
/// AVX-512 F/BW/VL; `out` holds `blocks.len() / B::BYTES * B::ELEMS` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dequantize_blocks<B: Block>(blocks: &[u8], out: &mut [f32]) {
    for (b, y) in blocks
        .chunks_exact(B::BYTES)
        .zip(out.chunks_exact_mut(B::ELEMS))
    {
        // SAFETY: `b` is one whole block and `y` its ELEMS outputs.
        unsafe { B::dequant(b, &mut Store(y)) };
    }
}

/// Most tokens [`few_tokens`] takes at once.
pub(super) const FEW_TOKENS: usize = 4;

/// `out[t * out_rows + r] = sum_k x[t * cols + k] * w[r, k]` for rows `r0..r1` and tokens
/// `t < n` (at most [`FEW_TOKENS`]): each block is dequantized in registers and multiplied
/// with every token at once, rows in memory order (one sequential stream), and
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
    // The token count becomes a constant, so the per-token loops unroll.
    unsafe {
        with_block!(qt, B => match n {
            1 => few::<B, 1>(w, cols, x, rows, out, out_rows),
            2 => few::<B, 2>(w, cols, x, rows, out, out_rows),
            3 => few::<B, 3>(w, cols, x, rows, out, out_rows),
            _ => few::<B, 4>(w, cols, x, rows, out, out_rows),
        })
    }
}

/// [`few_tokens`] for `N` tokens.
///
/// # Safety
/// As [`few_tokens`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::needless_range_loop)] // index loops over the per-token accumulators
unsafe fn few<B: Block, const N: usize>(
    w: &[u8],
    cols: usize,
    x: &[f32],
    rows: std::ops::Range<usize>,
    out: super::OutPtr,
    out_rows: usize,
) {
    let row_bytes = cols / B::ELEMS * B::BYTES;
    let mut r = rows.start;
    while r < rows.end {
        let g = (rows.end - r).min(16);
        let mut v = [[_mm512_setzero_ps(); 16]; N];
        for i in 0..g {
            let row = &w[(r + i) * row_bytes..][..row_bytes];
            // Four accumulators per token, so the multiply-adds' latency never limits.
            let mut acc = [[_mm512_setzero_ps(); 4]; N];
            for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
                // Token t's activations for this block are x[t * cols + k0..][..ELEMS], in
                // bounds as the caller checked.
                let k0 = b * B::ELEMS;
                let mut dot = Dot {
                    x: x[k0..].as_ptr(),
                    stride: cols,
                    acc: &mut acc,
                };
                // SAFETY: one whole block; `dot` reads ELEMS activations per token.
                unsafe { B::dequant(block, &mut dot) };
            }
            for t in 0..N {
                let a = &acc[t];
                v[t][i] = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            }
        }
        for t in 0..N {
            for (i, &value) in super::avx512::lane_sums(&v[t]).iter().enumerate().take(g) {
                // SAFETY: t * out_rows + r + i < out.len (checked by the caller); the caller's
                // task alone writes these rows.
                unsafe { *out.ptr.add(t * out_rows + r + i) = value };
            }
        }
        r += g;
    }
}
