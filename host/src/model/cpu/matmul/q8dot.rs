//! The fast path for quantized weights (`Numerics::Fast`): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and
//! IQ4_XS (256-element blocks, here) and Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL (32-element
//! blocks, in `block32`) times activations held as bytes, with AVX512-VNNI's `vpdpbusd` (64
//! products of unsigned and signed bytes, summed in fours into 16 i32 lanes, in one
//! instruction).
//!
//! Why: the exact path widens every weight to f32 and multiplies in f32. For these types that
//! widening, not memory, bounds a decode step (Q5_K_M decoded at half llama.cpp's speed while
//! reading under 10 GB/s). Integer products of the stored quants skip it.
//!
//! How:
//! - Each token's activations are rounded once per product, per 256 elements (the last run of
//!   a row may be shorter, a multiple of 32) with one f32 scale `dx = max|x| / 127`, to two
//!   signed bytes: `hi = round(x / dx)` and
//!   `lo = round(256·(x / dx − hi))`, so `x ≈ dx·(hi + lo / 256)` within `dx / 512`
//!   (2^-16 of the block's largest element). One byte alone (llama.cpp's Q8_K) errs by up to
//!   `dx / 2`: on the golden files that moved first-step logits by 0.4-0.7, far outside the
//!   2e-2 the fast numerics are held to. The second byte doubles the integer products, which
//!   still cost far less than widening. The sum of every 16 `256·hi + lo` is kept.
//! - Each weight block is unpacked into its quants as unsigned bytes `u`, in element order,
//!   an integer scale `s` and an integer min `m` per 16 elements, and two f32 factors `d` and
//!   `dm`, so that element `e` of group `g` is `d·s[g]·u[e] − dm·m[g]` (a type whose quants
//!   are centred on zero moves them to unsigned and puts the offset in `m`, with `dm = d`).
//! - The block's dot product with a token is then
//!   `dx/256·(d·Σg s[g]·Σ(u·(256·hi + lo)) − dm·Σg m[g]·Σ(256·hi + lo))`. Per 64 elements
//!   one `vpdpbusd` sums `u·hi`, and a second adds `u·lo` onto it shifted left by 8; the
//!   group scales multiply those 4-element sums as integers; the min term is summed in f32.
//!
//! Integers cannot overflow: `256·hi + lo` is within ±32640, so a 4-element sum times its
//! scale stays within 4·63·32640·128 < 2^31 for Q6_K (the widest: quants to 63, scales to
//! ±128; IQ4_XS: 241 and ±32), and such a type adds a block's four registers in f32. The
//! others (quants to 31, scales to 63) add them as integers: 16·31·32640·63 < 2^31.
//!
//! Only products of up to [`TOKENS`] tokens (decode) take this path; more tokens (prefill)
//! take `i16_panels`, which unpacks the weights with the same `unpack`.

use std::arch::x86_64::*;

use super::avx512::lane_sums;
use super::block32::{self, Iq4Nl, Small, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::dequant_avx512::f16_at;
use super::{job_size, run_tasks, threads_for, OutPtr, Part, TaskSplit, ThreadPool, WeightData};
use crate::model::quant::{QuantType, IQ4_VALUES};

/// Elements per activation block and weight block.
pub(super) const BLOCK: usize = 256;

/// Elements per scale group.
pub(super) const GROUP: usize = 16;

/// Most tokens per product on this path. Each tile of 4 tokens unpacks the weights again
/// (from L1), and the two-byte activations cost two `vpdpbusd` per 64 products, so with many
/// tokens the exact path's f32 panels (weights widened once, 16 products per FMA) win.
/// `cllm bench`, the 110M shapes as Q4_K_M, this path against the exact one, alternated:
/// 8 tokens 352-518 against 286-406 tokens/s, 16 tokens 498-564 against 489-520, 512
/// (prefill) 623-739 against 996-1037.
pub(super) const TOKENS: usize = 16;

/// Tokens per micro-kernel tile.
const TILE: usize = 4;

/// How far ahead of the block it multiplies a task asks for its weights. The hardware
/// prefetchers alone left decode short of the bandwidth. `cllm bench` decode at an empty
/// context, the 110M shapes as Q4_K_M, 2 threads, runs alternated: none 244-273 tokens/s,
/// 768 bytes ahead 254-282, 1536 bytes 276-300, 3072-6144 bytes 283-339, 9216 bytes 285-299.
pub(super) const PREFETCH_AHEAD: usize = 4096;

/// Proof that the CPU supports AVX-512 F, BW, VL and VNNI.
#[derive(Clone, Copy)]
pub(super) struct Q8Dot(());

impl Q8Dot {
    pub(super) fn new() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        ok.then_some(Q8Dot(()))
    }
}

/// [`IQ4_VALUES`] plus 128, as the unsigned bytes the integer products take (as `i8` bits), a
/// constant: built per block with `map`, it was a call per block that made IQ4_NL decode six
/// times slower than its exact path.
pub(super) const IQ4_UNSIGNED: [i8; 16] = {
    let mut grid = [0i8; 16];
    let mut i = 0;
    while i < 16 {
        grid[i] = (IQ4_VALUES[i] as i16 + 128) as u8 as i8;
        i += 1;
    }
    grid
};

/// Whether weights of type `qt` have a kernel here (or in `block32`).
pub(super) fn supports(qt: QuantType) -> bool {
    block32::supports(qt)
        || matches!(
            qt,
            QuantType::Q2K
                | QuantType::Q3K
                | QuantType::Q4K
                | QuantType::Q5K
                | QuantType::Q6K
                | QuantType::Iq4Xs
        )
}

/// Activations as two bytes each: for token `t` and element `k` of `cols`, at
/// `i = t·cols + k`, the value `d[t·runs + k / 256]·(hi[i] + lo[i] / 256)` with
/// `runs = ⌈cols / 256⌉`; `sums[j]` is the sum of `256·hi + lo` over the 16 elements from
/// `16·j`.
#[derive(Default)]
pub(crate) struct Q8Activations {
    pub(super) hi: Vec<i8>,
    pub(super) lo: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) sums: Vec<f32>,
    cols: usize,
}

impl Q8Activations {
    /// Rounds `x`, rows of `cols` elements (a multiple of 32), into `self`, reusing its
    /// buffers: each row in runs of 256 elements, the last one possibly shorter.
    pub(super) fn quantize(&mut self, _k: Q8Dot, x: &[f32], cols: usize) {
        let runs = activation_runs(x, cols);
        let n = x.len();
        self.cols = cols;
        self.hi.resize(n, 0);
        self.lo.resize(n, 0);
        self.d.resize(n / cols * cols.div_ceil(BLOCK), 0.0);
        self.sums.resize(n / GROUP, 0.0);
        for (scale, at, run) in runs {
            let hi = &mut self.hi[at..][..run.len()];
            let lo = &mut self.lo[at..][..run.len()];
            let sums = &mut self.sums[at / GROUP..][..run.len() / GROUP];
            // SAFETY: the token proves CPU support; the slices have the run's lengths.
            self.d[scale] = unsafe { quantize_block(run, hi, lo, sums) };
        }
    }

    /// The values as f32, for tests.
    #[cfg(test)]
    pub(super) fn values(&self) -> Vec<f32> {
        (0..self.hi.len())
            .map(|i| {
                let q = f32::from(self.hi[i]) + f32::from(self.lo[i]) / 256.0;
                self.d[run_of(i, self.cols)] * q
            })
            .collect()
    }
}

/// The runs in which the integer paths round activations: each row of `cols` elements (a
/// multiple of 32) in runs of 256, the last one possibly shorter. Yields each run's scale
/// index (`t·⌈cols/256⌉ + r` for run `r` of token `t`), its first element's index in `x`, and
/// its elements.
pub(super) fn activation_runs(
    x: &[f32],
    cols: usize,
) -> impl Iterator<Item = (usize, usize, &[f32])> {
    assert!(
        cols > 0 && cols.is_multiple_of(32),
        "rows of whole 32-element blocks"
    );
    assert!(x.len().is_multiple_of(cols), "whole rows");
    let runs = cols.div_ceil(BLOCK);
    x.chunks_exact(cols).enumerate().flat_map(move |(t, row)| {
        row.chunks(BLOCK)
            .enumerate()
            .map(move |(r, run)| (t * runs + r, t * cols + r * BLOCK, run))
    })
}

/// The scale index of element `i` of activation rows of `cols` elements (see
/// [`activation_runs`]).
#[cfg(test)]
pub(super) fn run_of(i: usize, cols: usize) -> usize {
    i / cols * cols.div_ceil(BLOCK) + i % cols / BLOCK
}

/// One run's scale `dx`; writes `hi = round(x / dx)` and `lo = round(256·(x / dx − hi))`
/// (nearest, ties to even; `lo` saturates at -128 and 127) and the 16-element sums.
///
/// # Safety
/// AVX-512 F/BW/VL; `x`, `hi` and `lo` hold the same number of elements, a multiple of 16 up
/// to 256, and `sums` one per 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_block(x: &[f32], hi: &mut [i8], lo: &mut [i8], sums: &mut [f32]) -> f32 {
    assert!(x.len() <= BLOCK && hi.len() == x.len() && lo.len() == x.len());
    assert!(sums.len() * GROUP == x.len());
    let (d, inv) = block_scale(x, 127.0);
    let inv = _mm512_set1_ps(inv);
    let at = |i: usize| i * GROUP;
    for (g, sum) in sums.iter_mut().enumerate() {
        // SAFETY: 16 floats in, 16 bytes out to each of `hi` and `lo`.
        unsafe {
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(at(g))), inv);
            let h = _mm512_cvtps_epi32(v);
            let rest = _mm512_sub_ps(v, _mm512_cvtepi32_ps(h));
            let l = _mm512_cvtps_epi32(_mm512_mul_ps(rest, _mm512_set1_ps(256.0)));
            let l8 = _mm512_cvtsepi32_epi8(l);
            _mm_storeu_si128(hi.as_mut_ptr().add(at(g)).cast(), _mm512_cvtsepi32_epi8(h));
            _mm_storeu_si128(lo.as_mut_ptr().add(at(g)).cast(), l8);
            let both = _mm512_add_epi32(_mm512_slli_epi32::<8>(h), _mm512_cvtepi8_epi32(l8));
            // At most 16·32640 in magnitude: exact in f32.
            *sum = _mm512_reduce_add_epi32(both) as f32;
        }
    }
    d
}

/// A block's scale `d = max|x| / range` and its inverse, so that `x / d` lies within
/// `±range`. A zero block (or one whose max is not finite) gets the inverse 0, so it rounds to
/// zeros, and the scale `max|x|`, which keeps its products what they were: zero, or not
/// finite.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn block_scale(x: &[f32], range: f32) -> (f32, f32) {
    let mut amax = _mm512_setzero_ps();
    for v in x.chunks_exact(GROUP) {
        // SAFETY: 16 floats.
        let v = unsafe { _mm512_loadu_ps(v.as_ptr()) };
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    }
    let amax = _mm512_reduce_max_ps(amax);
    if amax > 0.0 && amax.is_finite() {
        (amax / range, range / amax)
    } else {
        (amax, 0.0)
    }
}

/// One weight block unpacked (see the module's documentation): `u` holds elements
/// `64r..64r + 64` in `u[r]`; `scale` and `min` one i32 per 16-element group.
pub(super) struct Unpacked {
    pub u: [__m512i; 4],
    pub scale: __m512i,
    pub min: __m512i,
    pub d: f32,
    pub dm: f32,
}

/// A 256-element weight type this path multiplies.
pub(super) trait SuperBlock {
    const BYTES: usize;
    /// Quants up to 63 or more: a block's four scaled register sums could together overflow
    /// i32, so they are added in f32.
    const WIDE: bool;
    /// The quants are centred on zero: `min` is the scale times the offset that made them
    /// unsigned, and `dm` equals `d`.
    const CENTRED: bool;
    /// What `i16_panels` subtracts from the quants of a type that is not `CENTRED` (about
    /// half their range, moving the rest into the min), so that its i16 weights stay small.
    const RECENTRE: i16;
    /// The largest `|s·u − m|` (`CENTRED`) or `|s·(u − RECENTRE)|` (not) of an element:
    /// what bounds the i16 products of `i16_panels`.
    const MAX_WEIGHT: i32;
    /// Elements that share one min (16 or 32; for `CENTRED` types their scale groups).
    const MIN_GROUP: usize;

    /// # Safety
    /// AVX-512 F/BW/VL; `b` holds at least one whole block.
    unsafe fn unpack(b: &[u8]) -> Unpacked;
}

/// The little-endian u32 at `b[0..4]`.
#[inline]
fn u32_at(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// 16-bit shift counts: `s` in the low 256 bits, `s + 2` in the high ones (the two halves
/// of a register that hold elements two bits apart in their source bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn half_shifts(s: i16) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_set1_epi16(s), _mm256_set1_epi16(s + 2))
}

/// The low nibbles of `v`'s bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn low_nibbles(v: __m512i) -> __m512i {
    _mm512_and_si512(v, _mm512_set1_epi8(0x0f))
}

/// The high nibbles of `v`'s bytes, as values 0..16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn high_nibbles(v: __m512i) -> __m512i {
    _mm512_and_si512(_mm512_srli_epi16::<4>(v), _mm512_set1_epi8(0x0f))
}

/// 64 nibble bytes holding 128 elements the `Q4_K` way (each 32 bytes: 32 elements in the
/// low nibbles, the next 32 in the high ones) as those elements in order, 64 per register.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn nibbles_in_order(v: __m512i) -> [__m512i; 2] {
    let (lo, hi) = (low_nibbles(v), high_nibbles(v));
    [
        _mm512_shuffle_i64x2::<0b01_00_01_00>(lo, hi),
        _mm512_shuffle_i64x2::<0b11_10_11_10>(lo, hi),
    ]
}

/// Eight scales in the bytes of `lo` and eight in `hi` (as i32, groups 0-7 then 8-15).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn bytes_to_i32(lo: u64, hi: u64) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_set_epi64x(hi as i64, lo as i64))
}

/// Lane `g` = lane `g / 2` of `v`: eight per-32-element values spread over 16 groups.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn per_pair(v: __m512i, first: i32) -> __m512i {
    let f = first;
    let idx = _mm512_setr_epi32(
        f,
        f,
        f + 1,
        f + 1,
        f + 2,
        f + 2,
        f + 3,
        f + 3,
        f + 4,
        f + 4,
        f + 5,
        f + 5,
        f + 6,
        f + 6,
        f + 7,
        f + 7,
    );
    _mm512_permutexvar_epi32(idx, v)
}

/// `Q4_K` / `Q5_K` scales and mins (six bits each, packed in the 12 bytes `s`) as
/// 16 i32: scales of sub-blocks 0-7 then mins of sub-blocks 0-7.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn k4_scales_mins(s: &[u8]) -> __m512i {
    let (a, b, c) = (u32_at(s), u32_at(&s[4..]), u32_at(&s[8..]));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    // Sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins);
    // 4-7 have their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the
    // top bits of bytes 0-3 (scales) and 4-7 (mins).
    let scales = (a & LOW6) as u64 | ((((c & LOW4) | (((a >> 6) & TOP2) << 4)) as u64) << 32);
    let mins = (b & LOW6) as u64 | (((((c >> 4) & LOW4) | (((b >> 6) & TOP2) << 4)) as u64) << 32);
    bytes_to_i32(scales, mins)
}

pub(super) struct Q4K;

impl SuperBlock for Q4K {
    const BYTES: usize = 144;
    const WIDE: bool = false;
    const CENTRED: bool = false;
    const RECENTRE: i16 = 8;
    const MAX_WEIGHT: i32 = 63 * 8;
    const MIN_GROUP: usize = 32;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unpack(b: &[u8]) -> Unpacked {
        // The vector loads below read at most BYTES bytes from `p`.
        let p = b[..Self::BYTES].as_ptr();
        // SAFETY: a whole block is 144 bytes: d, dmin, 12 scale bytes, 128 nibble bytes.
        unsafe {
            let sm = k4_scales_mins(&b[4..16]);
            let [u0, u1] = nibbles_in_order(_mm512_loadu_si512(p.add(16).cast()));
            let [u2, u3] = nibbles_in_order(_mm512_loadu_si512(p.add(80).cast()));
            Unpacked {
                u: [u0, u1, u2, u3],
                scale: per_pair(sm, 0),
                min: per_pair(sm, 8),
                d: f16_at(b),
                dm: f16_at(&b[2..]),
            }
        }
    }
}

/// Sets `add` in every byte of `u[r]` whose element's bit is set in `bits`: the 32 bytes of
/// `bits` (repeated in both halves of `planes`) hold one bit per element for eight runs of
/// 32 elements, bit `p` of byte `l` being element `32p + l`'s.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn add_bit_planes(u: &mut [__m512i; 4], planes: __m512i, add: i8) {
    let add = _mm512_set1_epi8(add);
    for (r, u) in u.iter_mut().enumerate() {
        // Register r holds runs 2r (low half) and 2r + 1 (high half).
        let lo = _mm256_set1_epi8(1 << (2 * r));
        let hi = _mm256_set1_epi8((1u8 << (2 * r + 1)) as i8);
        let bit = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        let set = _mm512_test_epi8_mask(planes, bit);
        *u = _mm512_mask_add_epi8(*u, set, *u, add);
    }
}

/// 32 bytes at `p` in both 256-bit halves.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn twice_32(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 32 readable bytes.
    _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(p.cast()) })
}

pub(super) struct Q5K;

impl SuperBlock for Q5K {
    const BYTES: usize = 176;
    const WIDE: bool = false;
    const CENTRED: bool = false;
    const RECENTRE: i16 = 16;
    const MAX_WEIGHT: i32 = 63 * 16;
    const MIN_GROUP: usize = 32;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unpack(b: &[u8]) -> Unpacked {
        // The vector loads below read at most BYTES bytes from `p`.
        let p = b[..Self::BYTES].as_ptr();
        // SAFETY: a whole block is 176 bytes: d, dmin, 12 scale bytes, 32 bytes of fifth
        // bits, 128 nibble bytes.
        unsafe {
            let sm = k4_scales_mins(&b[4..16]);
            let [u0, u1] = nibbles_in_order(_mm512_loadu_si512(p.add(48).cast()));
            let [u2, u3] = nibbles_in_order(_mm512_loadu_si512(p.add(112).cast()));
            let mut u = [u0, u1, u2, u3];
            add_bit_planes(&mut u, twice_32(p.add(16)), 16);
            Unpacked {
                u,
                scale: per_pair(sm, 0),
                min: per_pair(sm, 8),
                d: f16_at(b),
                dm: f16_at(&b[2..]),
            }
        }
    }
}

pub(super) struct Q6K;

impl SuperBlock for Q6K {
    const BYTES: usize = 210;
    const WIDE: bool = true;
    const CENTRED: bool = true;
    const RECENTRE: i16 = 0;
    const MAX_WEIGHT: i32 = 128 * 32;
    const MIN_GROUP: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unpack(b: &[u8]) -> Unpacked {
        // The vector loads below read at most BYTES bytes from `p`.
        let p = b[..Self::BYTES].as_ptr();
        let mut u = [_mm512_setzero_si512(); 4];
        // SAFETY: a whole block is 210 bytes: 128 bytes of low nibbles, 64 of 2-bit high
        // parts, 16 i8 scales, d.
        unsafe {
            for h in 0..2 {
                // 128 elements: low nibbles of ql[l] and ql[l + 32] are elements l and
                // l + 32, their high nibbles l + 64 and l + 96; qh[l] holds the top two bits
                // of elements l, l + 32, l + 64, l + 96 in bits 0-1, 2-3, 4-5, 6-7.
                let ql = _mm512_loadu_si512(p.add(64 * h).cast());
                let qh = twice_32(p.add(128 + 32 * h));
                for (i, low) in [low_nibbles(ql), high_nibbles(ql)].into_iter().enumerate() {
                    let top = _mm512_srlv_epi16(qh, half_shifts(4 * i as i16));
                    let top = _mm512_and_si512(_mm512_slli_epi16::<4>(top), _mm512_set1_epi8(0x30));
                    u[2 * h + i] = _mm512_or_si512(low, top);
                }
            }
            let scale = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(192).cast()));
            let d = f16_at(&b[208..]);
            Unpacked {
                u,
                scale,
                // q − 32
                min: _mm512_slli_epi32::<5>(scale),
                d,
                dm: d,
            }
        }
    }
}

/// The 2-bit quants of `Q2_K` / `Q3_K` (64 bytes at `p`) in element order: element `e`
/// is bits `2j..2j+2` of byte `32n + l` for `n = e / 128`, `j = e % 128 / 32`, `l = e % 32`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn two_bit_quants(p: *const u8) -> [__m512i; 4] {
    let mut u = [_mm512_setzero_si512(); 4];
    // SAFETY: the caller guarantees 64 readable bytes.
    let v = unsafe { _mm512_loadu_si512(p.cast()) };
    let halves = [
        _mm512_shuffle_i64x2::<0b01_00_01_00>(v, v),
        _mm512_shuffle_i64x2::<0b11_10_11_10>(v, v),
    ];
    for (r, u) in u.iter_mut().enumerate() {
        // Register r: elements 64r.., runs j = 2(r % 2) (low half) and j + 1 (high half).
        let q = _mm512_srlv_epi16(halves[r / 2], half_shifts(4 * (r % 2) as i16));
        *u = _mm512_and_si512(q, _mm512_set1_epi8(3));
    }
    u
}

pub(super) struct Q2K;

impl SuperBlock for Q2K {
    const BYTES: usize = 84;
    const WIDE: bool = false;
    const CENTRED: bool = false;
    const RECENTRE: i16 = 0;
    const MAX_WEIGHT: i32 = 15 * 3;
    const MIN_GROUP: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unpack(b: &[u8]) -> Unpacked {
        // The vector loads below read at most BYTES bytes from `p`.
        let p = b[..Self::BYTES].as_ptr();
        // SAFETY: a whole block is 84 bytes: 16 scale bytes, 64 quant bytes, d, dmin.
        unsafe {
            let sm = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
            Unpacked {
                u: two_bit_quants(p.add(16)),
                scale: _mm512_and_si512(sm, _mm512_set1_epi32(0x0f)),
                min: _mm512_srli_epi32::<4>(sm),
                d: f16_at(&b[80..]),
                dm: f16_at(&b[82..]),
            }
        }
    }
}

pub(super) struct Q3K;

impl SuperBlock for Q3K {
    const BYTES: usize = 110;
    const WIDE: bool = false;
    const CENTRED: bool = true;
    const RECENTRE: i16 = 0;
    const MAX_WEIGHT: i32 = 32 * 4;
    const MIN_GROUP: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unpack(b: &[u8]) -> Unpacked {
        // The vector loads below read at most BYTES bytes from `p`.
        let p = b[..Self::BYTES].as_ptr();
        // SAFETY: a whole block is 110 bytes: 32 bytes of high-bit masks, 64 quant bytes,
        // 12 scale bytes, d.
        unsafe {
            let mut u = two_bit_quants(p.add(32));
            add_bit_planes(&mut u, twice_32(p), 4);
            // Scale g's low nibble is nibble g / 8 of byte g % 8; its top two bits are
            // bits 2·(g / 4).. of byte 8 + g % 4.
            let s = &b[96..108];
            let low = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
            let top = u32_at(&s[8..]);
            const TOP2: u32 = 0x0303_0303;
            let top_of = |g4: u32| ((top >> (2 * g4)) & TOP2) as u64;
            const LOW4: u64 = 0x0f0f_0f0f_0f0f_0f0f;
            let first = (low & LOW4) | ((top_of(0) | (top_of(1) << 32)) << 4);
            let second = ((low >> 4) & LOW4) | ((top_of(2) | (top_of(3) << 32)) << 4);
            let scale = _mm512_sub_epi32(bytes_to_i32(first, second), _mm512_set1_epi32(32));
            let d = f16_at(&b[108..]);
            Unpacked {
                u,
                scale,
                // (low | high << 2) − 4
                min: _mm512_slli_epi32::<2>(scale),
                d,
                dm: d,
            }
        }
    }
}

pub(super) struct Iq4Xs;

impl SuperBlock for Iq4Xs {
    const BYTES: usize = 136;
    const WIDE: bool = true;
    const CENTRED: bool = true;
    const RECENTRE: i16 = 0;
    const MAX_WEIGHT: i32 = 32 * 127;
    const MIN_GROUP: usize = 32;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unpack(b: &[u8]) -> Unpacked {
        // The vector loads below read at most BYTES bytes from `p`.
        let p = b[..Self::BYTES].as_ptr();
        // The grid's values plus 128, as unsigned bytes, in every 128-bit lane.
        // SAFETY: 16 bytes.
        let table =
            _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(IQ4_UNSIGNED.as_ptr().cast()) });
        let mut u = [_mm512_setzero_si512(); 4];
        // SAFETY: a whole block is 136 bytes: d, 2 + 4 scale bytes, 128 nibble bytes.
        unsafe {
            for h in 0..2 {
                // Four sub-blocks of 16 bytes: the low nibbles are a sub-block's first 16
                // elements, the high nibbles its last 16.
                let v = _mm512_loadu_si512(p.add(8 + 64 * h).cast());
                let lo = _mm512_shuffle_epi8(table, low_nibbles(v));
                let hi = _mm512_shuffle_epi8(table, high_nibbles(v));
                let first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
                let second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
                u[2 * h] = _mm512_permutex2var_epi64(lo, first, hi);
                u[2 * h + 1] = _mm512_permutex2var_epi64(lo, second, hi);
            }
            // `quant::iq4xs_scale`'s bits, all eight from one u32 of low nibbles: calling the
            // reference per sub-block made this unpack slower (14.0 against 13.1 ns per block
            // from L2).
            let high = u32::from(u16::from_le_bytes([b[2], b[3]]));
            let low = u32_at(&b[4..]);
            let mut scales = 0u64;
            for s in 0..8 {
                let ls = ((low >> (4 * s)) & 0x0f) | (((high >> (2 * s)) & 3) << 4);
                scales |= u64::from(ls) << (8 * s);
            }
            let scale =
                _mm512_sub_epi32(per_pair(bytes_to_i32(scales, 0), 0), _mm512_set1_epi32(32));
            let d = f16_at(b);
            Unpacked {
                u,
                scale,
                // T[q] + 128 − 128
                min: _mm512_slli_epi32::<7>(scale),
                d,
                dm: d,
            }
        }
    }
}

/// Quantized weights times 8-bit activations, for one or more matrices of equal `cols`.
pub(super) struct Product<'a> {
    pub x: &'a Q8Activations,
    pub n_tokens: usize,
    pub cols: usize,
    pub parts: &'a [Option<Part<'a>>],
}

impl Product<'_> {
    pub(super) fn run(&self, k: Q8Dot, pool: &ThreadPool) {
        let cols = self.cols;
        assert!(self.x.hi.len() >= self.n_tokens * cols && self.x.cols == cols);
        let (rows, work) = job_size(self.parts, self.n_tokens);
        if rows == 0 || self.n_tokens == 0 {
            return;
        }
        let threads = threads_for(pool, work);
        let split = TaskSplit::guided(self.parts, threads, 16);
        run_tasks(pool, threads, self.parts, &split, |part, r0, r1| {
            let WeightData::Quant(qt, w) = part.w.data else {
                unreachable!("the 8-bit path only takes quantized weights");
            };
            assert!(
                cols.is_multiple_of(qt.block_elems()),
                "whole blocks per row"
            );
            assert_eq!(w.len(), qt.bytes_for(part.w.rows * cols));
            assert!(self.n_tokens * part.w.rows <= part.out.len);
            // SAFETY: the token proves CPU support. Rows r0..r1 of `w` and every token of
            // `x` are in bounds (checked above); tasks own disjoint rows of each part's
            // output, which outlives the product.
            unsafe { self.rows_of(k, qt, w, part.out, part.w.rows, r0..r1) };
        });
    }

    /// # Safety
    /// As [`Product::rows`].
    unsafe fn rows_of(
        &self,
        k: Q8Dot,
        qt: QuantType,
        w: &[u8],
        out: OutPtr,
        out_rows: usize,
        rows: std::ops::Range<usize>,
    ) {
        // SAFETY: forwarded.
        unsafe {
            match qt {
                QuantType::Q2K => self.rows::<Q2K>(k, w, out, out_rows, rows),
                QuantType::Q3K => self.rows::<Q3K>(k, w, out, out_rows, rows),
                QuantType::Q4K => self.rows::<Q4K>(k, w, out, out_rows, rows),
                QuantType::Q5K => self.rows::<Q5K>(k, w, out, out_rows, rows),
                QuantType::Q6K => self.rows::<Q6K>(k, w, out, out_rows, rows),
                QuantType::Iq4Xs => self.rows::<Iq4Xs>(k, w, out, out_rows, rows),
                QuantType::Q4_0 => self.rows::<Small<Q4_0>>(k, w, out, out_rows, rows),
                QuantType::Q4_1 => self.rows::<Small<Q4_1>>(k, w, out, out_rows, rows),
                QuantType::Q5_0 => self.rows::<Small<Q5_0>>(k, w, out, out_rows, rows),
                QuantType::Q5_1 => self.rows::<Small<Q5_1>>(k, w, out, out_rows, rows),
                QuantType::Q8_0 => self.rows::<Small<Q8_0>>(k, w, out, out_rows, rows),
                QuantType::Iq4Nl => self.rows::<Small<Iq4Nl>>(k, w, out, out_rows, rows),
            }
        }
    }

    /// Rows `rows` for every token: 16 rows at a time, and for those rows, every tile of up
    /// to [`TILE`] tokens (the rows' weights stay in L1 across the tiles).
    ///
    /// # Safety
    /// `w` holds `out_rows` rows of `B` blocks, `rows.end <= out_rows`; `out` holds
    /// `n_tokens * out_rows` floats and no other thread touches rows `rows`.
    unsafe fn rows<B: Tile>(
        &self,
        _k: Q8Dot,
        w: &[u8],
        out: OutPtr,
        out_rows: usize,
        rows: std::ops::Range<usize>,
    ) {
        let n = self.n_tokens;
        let mut r = rows.start;
        while r < rows.end {
            let group = r..(r + 16).min(rows.end);
            let mut t0 = 0;
            while t0 < n {
                let tile = (n - t0).min(TILE);
                let group = group.clone();
                // SAFETY: forwarded; the tile's token count becomes a constant, so the
                // per-token loops unroll.
                unsafe {
                    match tile {
                        1 => B::tile::<1>(self, w, out, out_rows, group, t0),
                        2 => B::tile::<2>(self, w, out, out_rows, group, t0),
                        3 => B::tile::<3>(self, w, out, out_rows, group, t0),
                        _ => B::tile::<4>(self, w, out, out_rows, group, t0),
                    }
                }
                t0 += tile;
            }
            r = group.end;
        }
    }

    /// At most 16 `rows` for the `N` tokens from `t0`, the rows' sums reduced together.
    ///
    /// # Safety
    /// As [`Tile::tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // index loops over the per-token accumulators
    unsafe fn super_tile<B: SuperBlock, const N: usize>(
        &self,
        w: &[u8],
        out: OutPtr,
        out_rows: usize,
        rows: std::ops::Range<usize>,
        t0: usize,
    ) {
        let cols = self.cols;
        let blocks = cols / BLOCK;
        let row_bytes = blocks * B::BYTES;
        assert!(w.len() >= rows.end * row_bytes);
        assert!(N == 0 || (t0 + N - 1) * out_rows + rows.end <= out.len);
        let (x_hi, x_lo) = (self.x.hi.as_ptr(), self.x.lo.as_ptr());
        let (xd, xs) = (self.x.d.as_ptr(), self.x.sums.as_ptr());
        // Lane l of a `vpdpbusd` result sums elements 4l..4l + 4 of its 64: group
        // 4r + l / 4 of the block for register r.
        let lane_groups: [__m512i; 4] = std::array::from_fn(|r| {
            let g = 4 * r as i32;
            _mm512_setr_epi32(
                g,
                g,
                g,
                g,
                g + 1,
                g + 1,
                g + 1,
                g + 1,
                g + 2,
                g + 2,
                g + 2,
                g + 2,
                g + 3,
                g + 3,
                g + 3,
                g + 3,
            )
        });
        let g = rows.len();
        assert!(g <= 16);
        let mut v = [[_mm512_setzero_ps(); 16]; N];
        for i in 0..g {
            let row = &w[(rows.start + i) * row_bytes..][..row_bytes];
            let mut acc = [_mm512_setzero_ps(); N];
            for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
                // SAFETY: `block` is one whole block; token t's activations for block b start
                // at t·cols + 256b, its sums at (t·cols + 256b) / 16 and its scale at
                // t·blocks + b, all in bounds as `run` checked.
                unsafe {
                    // The stream PREFETCH_AHEAD bytes on, one request per cache line of this
                    // block (past the task's end it only warms another's rows).
                    let ahead = block.as_ptr().wrapping_add(PREFETCH_AHEAD);
                    for line in (0..B::BYTES).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                    }
                    let wb = B::unpack(block);
                    let scales = lane_groups.map(|l| _mm512_permutexvar_epi32(l, wb.scale));
                    // The products are in units of dx/256.
                    let d = _mm512_set1_ps(wb.d / 256.0);
                    let min =
                        _mm512_mul_ps(_mm512_cvtepi32_ps(wb.min), _mm512_set1_ps(wb.dm / 256.0));
                    for t in 0..N {
                        let token = t0 + t;
                        let at = token * cols + b * BLOCK;
                        // Per register, 256·Σ(u·hi) + Σ(u·lo): the second product
                        // accumulates onto the shifted first.
                        let scaled: [__m512i; 4] = std::array::from_fn(|q| {
                            let xh = _mm512_loadu_si512(x_hi.add(at + 64 * q).cast());
                            let xl = _mm512_loadu_si512(x_lo.add(at + 64 * q).cast());
                            let zero = _mm512_setzero_si512();
                            let dh = _mm512_dpbusd_epi32(zero, wb.u[q], xh);
                            let c = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(dh), wb.u[q], xl);
                            _mm512_mullo_epi32(c, scales[q])
                        });
                        let total = if B::WIDE {
                            let f = scaled.map(|p| _mm512_cvtepi32_ps(p));
                            _mm512_add_ps(_mm512_add_ps(f[0], f[1]), _mm512_add_ps(f[2], f[3]))
                        } else {
                            let a = _mm512_add_epi32(scaled[0], scaled[1]);
                            let b = _mm512_add_epi32(scaled[2], scaled[3]);
                            _mm512_cvtepi32_ps(_mm512_add_epi32(a, b))
                        };
                        let sums = _mm512_loadu_ps(xs.add(at / GROUP));
                        let block_sum = _mm512_fmsub_ps(total, d, _mm512_mul_ps(min, sums));
                        let dx = _mm512_set1_ps(*xd.add(token * blocks + b));
                        acc[t] = _mm512_fmadd_ps(block_sum, dx, acc[t]);
                    }
                }
            }
            for t in 0..N {
                v[t][i] = acc[t];
            }
        }
        // SAFETY: forwarded; the bounds were checked above.
        unsafe { write_tile(&v, g, out, out_rows, rows.start, t0) };
    }
}

/// Writes a tile's results: token `t0 + t`'s row `first + i` is the sum of the lanes of
/// `v[t][i]`, for the tile's `g` rows.
///
/// # Safety
/// AVX-512 F/BW/VL; `(t0 + N - 1)·out_rows + first + g <= out.len`, and no other thread
/// writes these rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn write_tile<const N: usize>(
    v: &[[__m512; 16]; N],
    g: usize,
    out: OutPtr,
    out_rows: usize,
    first: usize,
    t0: usize,
) {
    for (t, v) in v.iter().enumerate() {
        for (i, &value) in lane_sums(v).iter().enumerate().take(g) {
            // SAFETY: in bounds as the caller guarantees; this task alone writes these rows.
            unsafe { *out.ptr.add((t0 + t) * out_rows + first + i) = value };
        }
    }
}

/// A weight type's kernel for one tile: at most 16 rows times at most [`TILE`] tokens.
pub(super) trait Tile {
    /// At most 16 `rows` for the `N` tokens from `t0`, written to `out`.
    ///
    /// # Safety
    /// As [`Product::rows`], `t0 + N <= n_tokens`, and AVX-512 F/BW/VL/VNNI.
    unsafe fn tile<const N: usize>(
        p: &Product,
        w: &[u8],
        out: OutPtr,
        out_rows: usize,
        rows: std::ops::Range<usize>,
        t0: usize,
    );
}

impl<B: SuperBlock> Tile for B {
    unsafe fn tile<const N: usize>(
        p: &Product,
        w: &[u8],
        out: OutPtr,
        out_rows: usize,
        rows: std::ops::Range<usize>,
        t0: usize,
    ) {
        // SAFETY: forwarded.
        unsafe { p.super_tile::<B, N>(w, out, out_rows, rows, t0) }
    }
}
