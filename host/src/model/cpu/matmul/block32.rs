//! `q8dot`'s two-byte path for the 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
//! IQ4_NL, the types of most older GGUF files and of the parts of newer ones whose rows are
//! not a multiple of 256 (SmolLM2-135M's 576).
//!
//! Why: these types computed exactly, every weight widened to f32 and multiplied in f32, and
//! that widening, not memory, bounded decode: `cllm bench` at an empty context on the 110M
//! shapes as Q4_0 read its weights at 15.8 GB/s while a plain read ran at 35 GB/s.
//!
//! How: the activations are `q8dot`'s, two bytes per element with one scale per run of 256
//! (the last run of a row may be shorter). Each weight block is unpacked to 32 unsigned bytes
//! `u` in element order and two f32 factors, so that element `e` is `d·u[e] + c`: `c` is
//! `−d·OFFSET` for the types whose quants are centred (Q4_0 on 8, Q5_0 on 16; Q8_0 and IQ4_NL
//! hold signed values, moved up by 128 to be unsigned), or the stored min `m` (Q4_1, Q5_1).
//! Two blocks fill a register of 64 bytes; per register `q8dot`'s two `vpdpbusd` give 16 lane
//! sums of `u·(256·hi + lo)` over four elements each, all of one block, converted to f32 and
//! multiplied by their block's `d`; the `c` terms multiply the activations' sums per 16. Each
//! run of eight blocks then multiplies by its activation scale.
//!
//! Integers: `u` is at most 255 and `|256·hi + lo|` at most 32640, so a lane's four products
//! stay under 2^25, well inside i32; converted to f32 they round by at most 2^-24 of their
//! size.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::q8dot::{write_tile, Product, Tile, BLOCK, GROUP, IQ4_UNSIGNED, PREFETCH_AHEAD};
use super::OutPtr;
use crate::model::quant::QuantType;

/// Elements per block.
const ELEMS: usize = 32;

/// Blocks per activation run.
const PER_RUN: usize = BLOCK / ELEMS;

/// Whether weights of type `qt` have a kernel here.
pub(super) fn supports(qt: QuantType) -> bool {
    matches!(
        qt,
        QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::Q8_0
            | QuantType::Iq4Nl
    )
}

/// A 32-element weight type this path multiplies.
pub(super) trait Block32 {
    const BYTES: usize;
    /// The block stores a min `m` (f16, bytes 2..4): element `e` is `d·u[e] + m`.
    const HAS_MIN: bool;
    /// Without a min, element `e` is `d·(u[e] − OFFSET)`.
    const OFFSET: f32;

    /// The block's quants as unsigned bytes in element order.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `b` holds at least one whole block.
    unsafe fn quants(b: &[u8]) -> __m256i;
}

/// The 32 nibbles of the 16 bytes at `p` in element order: element `j` is the low nibble of
/// byte `j`, element `j + 16` its high nibble.
///
/// # Safety
/// AVX-512 F/BW/VL; 16 bytes readable at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes.
    let v = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
    // The low half keeps the low nibbles, the high half shifts the high ones down.
    let shifts = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
    _mm256_and_si256(_mm256_srlv_epi16(v, shifts), _mm256_set1_epi8(0x0f))
}

/// `u` with 16 added to element `j` where bit `j` of the little-endian u32 at `p` is set.
///
/// # Safety
/// AVX-512 F/BW/VL; 4 bytes readable at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn fifth_bits(u: __m256i, p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes.
    let bits = u32::from_le_bytes(unsafe { p.cast::<[u8; 4]>().read_unaligned() });
    _mm256_mask_add_epi8(u, bits, u, _mm256_set1_epi8(16))
}

#[allow(non_camel_case_types)] // named as GGML names the type
pub(super) struct Q4_0;

impl Block32 for Q4_0 {
    const BYTES: usize = 18;
    const HAS_MIN: bool = false;
    const OFFSET: f32 = 8.0;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn quants(b: &[u8]) -> __m256i {
        // SAFETY: a whole block is d, then 16 nibble bytes.
        unsafe { nibbles(b[..Self::BYTES].as_ptr().add(2)) }
    }
}

#[allow(non_camel_case_types)] // named as GGML names the type
pub(super) struct Q4_1;

impl Block32 for Q4_1 {
    const BYTES: usize = 20;
    const HAS_MIN: bool = true;
    const OFFSET: f32 = 0.0;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn quants(b: &[u8]) -> __m256i {
        // SAFETY: a whole block is d, m, then 16 nibble bytes.
        unsafe { nibbles(b[..Self::BYTES].as_ptr().add(4)) }
    }
}

#[allow(non_camel_case_types)] // named as GGML names the type
pub(super) struct Q5_0;

impl Block32 for Q5_0 {
    const BYTES: usize = 22;
    const HAS_MIN: bool = false;
    const OFFSET: f32 = 16.0;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn quants(b: &[u8]) -> __m256i {
        let p = b[..Self::BYTES].as_ptr();
        // SAFETY: a whole block is d, 4 bytes of fifth bits, then 16 nibble bytes.
        unsafe { fifth_bits(nibbles(p.add(6)), p.add(2)) }
    }
}

#[allow(non_camel_case_types)] // named as GGML names the type
pub(super) struct Q5_1;

impl Block32 for Q5_1 {
    const BYTES: usize = 24;
    const HAS_MIN: bool = true;
    const OFFSET: f32 = 0.0;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn quants(b: &[u8]) -> __m256i {
        let p = b[..Self::BYTES].as_ptr();
        // SAFETY: a whole block is d, m, 4 bytes of fifth bits, then 16 nibble bytes.
        unsafe { fifth_bits(nibbles(p.add(8)), p.add(4)) }
    }
}

#[allow(non_camel_case_types)] // named as GGML names the type
pub(super) struct Q8_0;

impl Block32 for Q8_0 {
    const BYTES: usize = 34;
    const HAS_MIN: bool = false;
    const OFFSET: f32 = 128.0;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn quants(b: &[u8]) -> __m256i {
        let p = b[..Self::BYTES].as_ptr();
        // SAFETY: a whole block is d, then 32 signed bytes; flipping the top bit adds 128.
        unsafe {
            let q = _mm256_loadu_si256(p.add(2).cast());
            _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN))
        }
    }
}

pub(super) struct Iq4Nl;

impl Block32 for Iq4Nl {
    const BYTES: usize = 18;
    const HAS_MIN: bool = false;
    const OFFSET: f32 = 128.0;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn quants(b: &[u8]) -> __m256i {
        // SAFETY: 16 bytes; a whole block is d, then 16 nibble bytes.
        unsafe {
            // The grid's values plus 128, as unsigned bytes, in both 128-bit lanes.
            let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_UNSIGNED.as_ptr().cast()));
            _mm256_shuffle_epi8(table, nibbles(b[..Self::BYTES].as_ptr().add(2)))
        }
    }
}

/// The kernel of a [`Block32`] type, for `q8dot`'s rows and tiles.
pub(super) struct Small<B>(PhantomData<B>);

impl<B: Block32> Tile for Small<B> {
    unsafe fn tile<const N: usize>(
        p: &Product,
        w: &[u8],
        out: OutPtr,
        out_rows: usize,
        rows: std::ops::Range<usize>,
        t0: usize,
    ) {
        // SAFETY: forwarded.
        unsafe { tile::<B, N>(p, w, out, out_rows, rows, t0) }
    }
}

/// One run (at most eight blocks) of one row, unpacked: `u[r]` holds blocks `2r` and
/// `2r + 1`; `d[r]` their factors `d / 256` per lane of a `vpdpbusd` result (lanes 0-7 the
/// first block, 8-15 the second); `c` the offsets `c / 256` per 16-element group. Blocks
/// past the run's end are zero, their factors and offsets too.
struct Run<const REGS: usize> {
    u: [__m512i; REGS],
    d: [__m512; REGS],
    c: __m512,
}

/// The number of blocks in `bytes`: `2·REGS` when `FULL` (a constant, so that the loops over
/// blocks need no tests), else `2·REGS − 1` or `2·REGS`.
#[inline]
fn block_count<B: Block32, const REGS: usize, const FULL: bool>(bytes: &[u8]) -> usize {
    let n = if FULL {
        2 * REGS
    } else {
        bytes.len() / B::BYTES
    };
    assert!(bytes.len() == n * B::BYTES && n + 1 >= 2 * REGS && n <= 2 * REGS);
    n
}

/// Unpacks the `n` whole blocks in `bytes` (as [`block_count`] gives them).
///
/// # Safety
/// AVX-512 F/BW/VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn unpack<B: Block32, const REGS: usize>(bytes: &[u8], n: usize) -> Run<REGS> {
    // A loop of constant length, not a closure, so that it unrolls and `u` stays in
    // registers (`std::array::from_fn` here was compiled out of line, three times slower).
    let mut u = [_mm512_setzero_si512(); REGS];
    for (r, u) in u.iter_mut().enumerate() {
        // SAFETY: whole blocks.
        let first = unsafe { B::quants(&bytes[2 * r * B::BYTES..]) };
        let second = if 2 * r + 1 < n {
            // SAFETY: as above.
            unsafe { B::quants(&bytes[(2 * r + 1) * B::BYTES..]) }
        } else {
            _mm256_setzero_si256()
        };
        *u = _mm512_inserti64x4::<1>(_mm512_zextsi256_si512(first), second);
    }
    // The f16 factors of each block (d at byte 0, the min at byte 2), gathered in general
    // registers: vector inserts of single halves cost more of the vector units this kernel
    // is bound by.
    let mut d_bits = [0u64; 2];
    let mut m_bits = [0u64; 2];
    for j in 0..2 * REGS {
        if j < n {
            let b = &bytes[j * B::BYTES..];
            let shift = 16 * (j % 4);
            d_bits[j / 4] |= u64::from(u16::from_le_bytes([b[0], b[1]])) << shift;
            if B::HAS_MIN {
                m_bits[j / 4] |= u64::from(u16::from_le_bytes([b[2], b[3]])) << shift;
            }
        }
    }
    let halves = |bits: [u64; 2]| {
        let v = _mm_set_epi64x(bits[1] as i64, bits[0] as i64);
        _mm512_cvtph_ps(_mm256_zextsi128_si256(v))
    };
    let unit = _mm512_set1_ps(1.0 / 256.0);
    let d = _mm512_mul_ps(halves(d_bits), unit);
    let c = if B::HAS_MIN {
        _mm512_mul_ps(halves(m_bits), unit)
    } else {
        _mm512_mul_ps(d, _mm512_set1_ps(-B::OFFSET))
    };
    let per_group = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let mut per_lane = [_mm512_setzero_ps(); REGS];
    for (r, lanes) in per_lane.iter_mut().enumerate() {
        let (a, b) = (2 * r as i32, 2 * r as i32 + 1);
        let idx = _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
        *lanes = _mm512_permutexvar_ps(idx, d);
    }
    Run {
        u,
        d: per_lane,
        c: _mm512_permutexvar_ps(per_group, c),
    }
}

/// The products of one run of one row with the `N` tokens from `t0`, added to `acc`: the
/// run's blocks (see [`block_count`]) are `bytes`, its activations start at element
/// `r·256` of each token's row.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; the activations hold tokens `t0..t0 + N` whole.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn run_products<B: Block32, const N: usize, const REGS: usize, const FULL: bool>(
    p: &Product,
    bytes: &[u8],
    r: usize,
    t0: usize,
    acc: &mut [__m512; N],
) {
    let n = block_count::<B, REGS, FULL>(bytes);
    // SAFETY: the CPU support is the caller's.
    let run = unsafe { unpack::<B, REGS>(bytes, n) };
    // What belongs to the run: an odd block count leaves the last register half full, and
    // the activations past the run's end may lie past the buffer (the end of the last row).
    let tail: __mmask64 = if n % 2 == 1 { 0xffff_ffff } else { !0 };
    let groups = ((1u32 << (2 * n)) - 1) as __mmask16;
    let x = p.x;
    let runs = p.cols.div_ceil(BLOCK);
    for (t, acc) in acc.iter_mut().enumerate() {
        let token = t0 + t;
        let at = token * p.cols + r * BLOCK;
        // SAFETY: the token's run lies inside the activations (the caller's); masked-off
        // bytes are not read.
        unsafe {
            let sums = _mm512_maskz_loadu_ps(groups, x.sums.as_ptr().add(at / GROUP));
            let mut s = _mm512_mul_ps(run.c, sums);
            for q in 0..REGS {
                let mask = if q + 1 == REGS { tail } else { !0 };
                let xh = _mm512_maskz_loadu_epi8(mask, x.hi.as_ptr().add(at + 64 * q));
                let xl = _mm512_maskz_loadu_epi8(mask, x.lo.as_ptr().add(at + 64 * q));
                let dh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), run.u[q], xh);
                let both = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(dh), run.u[q], xl);
                s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(both), run.d[q], s);
            }
            let dx = _mm512_set1_ps(x.d[token * runs + r]);
            *acc = _mm512_fmadd_ps(s, dx, *acc);
        }
    }
}

/// At most 16 `rows` for the `N` tokens from `t0`, the rows' sums reduced together.
///
/// # Safety
/// As [`Tile::tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // index loops over the per-token accumulators
unsafe fn tile<B: Block32, const N: usize>(
    p: &Product,
    w: &[u8],
    out: OutPtr,
    out_rows: usize,
    rows: std::ops::Range<usize>,
    t0: usize,
) {
    let cols = p.cols;
    let blocks = cols / ELEMS;
    let runs = cols.div_ceil(BLOCK);
    let row_bytes = blocks * B::BYTES;
    assert!(w.len() >= rows.end * row_bytes);
    assert!(N == 0 || (t0 + N - 1) * out_rows + rows.end <= out.len);
    assert!(p.x.hi.len() >= (t0 + N) * cols && p.x.d.len() >= (t0 + N) * runs);
    let g = rows.len();
    assert!(g <= 16);
    let mut v = [[_mm512_setzero_ps(); 16]; N];
    for i in 0..g {
        let row = &w[(rows.start + i) * row_bytes..][..row_bytes];
        let mut acc = [_mm512_setzero_ps(); N];
        for r in 0..runs {
            let first = r * PER_RUN;
            let n_blocks = (blocks - first).min(PER_RUN);
            let bytes = &row[first * B::BYTES..][..n_blocks * B::BYTES];
            // The stream PREFETCH_AHEAD bytes on, one request per cache line of this run (past the
            // task's end it only warms another's rows).
            let ahead = bytes.as_ptr().wrapping_add(PREFETCH_AHEAD);
            for line in (0..bytes.len()).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
            // SAFETY: tokens t0..t0 + N are inside the activations (checked above); the
            // CPU support is the caller's.
            unsafe {
                match n_blocks {
                    PER_RUN => run_products::<B, N, 4, true>(p, bytes, r, t0, &mut acc),
                    7 => run_products::<B, N, 4, false>(p, bytes, r, t0, &mut acc),
                    5 | 6 => run_products::<B, N, 3, false>(p, bytes, r, t0, &mut acc),
                    3 | 4 => run_products::<B, N, 2, false>(p, bytes, r, t0, &mut acc),
                    _ => run_products::<B, N, 1, false>(p, bytes, r, t0, &mut acc),
                }
            }
        }
        for t in 0..N {
            v[t][i] = acc[t];
        }
    }
    // SAFETY: the bounds were checked above; the rows are this task's.
    unsafe { write_tile(&v, g, out, out_rows, rows.start, t0) };
}
