//! The fast path for prefill with quantized weights (`Numerics::Fast`): Q2_K, Q3_K, Q4_K,
//! Q5_K, Q6_K and IQ4_XS, and Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL (whose rows may end in
//! a run shorter than 256 elements), times many tokens, as 16-bit integer products with
//! AVX512-VNNI's `vpdpwssd` (32 products of i16 pairs, summed in pairs into 16 i32 lanes, in
//! one instruction: twice an f32 FMA's multiply-adds).
//!
//! Why: the exact path widens each panel of weights to f32 once and multiplies in f32; with
//! hundreds of tokens that is compute-bound at 16 multiply-adds per instruction, and the
//! 8-bit decode kernels (`q8dot`) unpack every block again for each token tile.
//!
//! How:
//! - Activations: each token's, per run of 256 elements (a row's last run may be shorter),
//!   one f32 scale `dx = max|x| / 32767` and `q = round(x / dx)` as i16 (within `dx / 2`,
//!   2^-16 of the run's largest element, as the decode path's two bytes). The sums of `dx·q` over each 16 and each 32 elements are
//!   kept for the min terms. With `max|x| / 8191` (fewer conversions below) the
//!   llama-quantize fixtures' first-step logits moved by up to 8.5e-3 of the logit, against
//!   2.9e-3 with this range.
//! - Weights: each task unpacks a panel of its rows once per block of columns (`q8dot`'s
//!   `unpack`) into i16 weights with the group scale folded in: `s·u − m` for types centred
//!   on zero; for types with mins `s·(u − c)`, `c` about half the quants' range (so the
//!   weights, and the products, stay small), and per row and min group the f32 min
//!   `dm·m − c·d·s`. The block's `d` is kept per row as f32. The panel holds 16 rows side by
//!   side per element pair (`[pair][row][2]`), so one load feeds 16 rows.
//! - The micro-kernel broadcasts one token's element pair and multiplies it into 16 rows at
//!   a time: a tile of up to 6 tokens times 32 rows, in i32 accumulators that are converted
//!   and added into f32 block sums before they could overflow; each block's sums are then
//!   scaled by `d·dx`, and the min terms (the f32 min times `Σ(dx·q)` per group) are
//!   subtracted.
//! - The 32-element types ([`Eight`]) go through the same panels and tiles, eight blocks at
//!   a time: their quants are the i16 weights as they are (centred by the type's offset, or
//!   unsigned with the stored min as the min term), and each block keeps its own `d`, so
//!   the flush interval is the block, and its sums multiply by `d` as they are converted.
//!
//! Integers cannot overflow: `|q| <= 32767` and each type's `|w|` has a bound
//! ([`SuperBlock::MAX_WEIGHT`], 4096 for Q6_K), so `FLUSH` elements (the most that keep
//! `FLUSH·MAX_WEIGHT·32767 < 2^31`, a power of two: 16 for Q6_K and IQ4_XS, 64 for Q5_K,
//! 128 for Q4_K, 256 for Q2_K and Q3_K) are summed in i32 before each conversion.

use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::sync::Mutex;

use super::block32::{Block32, Iq4Nl, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::q8dot::{activation_runs, block_scale, Iq4Xs, Q8Dot, SuperBlock};
use super::q8dot::{Q2K, Q3K, Q4K, Q5K, Q6K};
use super::{job_size, run_tasks, threads_for, with_slot, OutPtr, Part, TaskSplit, ThreadPool};
use super::{WeightData, K_BLOCK};
use crate::model::quant::QuantType;

/// Elements per activation block and weight block.
const BLOCK: usize = 256;

/// Elements per activation sum (the smaller min group).
const GROUP: usize = 16;

/// The largest `|q|` of the activations.
const RANGE: i32 = 32767;

/// Tokens per micro-kernel tile.
const TOKENS: usize = 6;

/// Rows per register (and per panel group).
const LANES: usize = 16;

/// Weight bytes of one panel (with a token tile's activations it stays in L2).
const PANEL_BYTES: usize = 128 << 10;

/// Activations as i16: for token `t` and element `k` of `cols`, at `i = t·cols + k`, the
/// value `dx[t·⌈cols/256⌉ + k/256]·q[i]`; `sums[j]` is the sum of those values over the 16
/// elements from `16·j`, `sums32[j]` over the 32 from `32·j`.
#[derive(Default)]
pub(crate) struct I16Activations {
    q: Vec<i16>,
    dx: Vec<f32>,
    sums: Vec<f32>,
    sums32: Vec<f32>,
    /// Elements per row.
    cols: usize,
}

impl I16Activations {
    /// Rounds `x`, rows of `cols` elements (a multiple of 32), into `self`, reusing its
    /// buffers: each row in runs of 256, the last one shorter where `cols` is not a multiple
    /// of 256; run `r` of token `t` has the scale `dx[t·⌈cols/256⌉ + r]`.
    pub(super) fn quantize(&mut self, _k: Q8Dot, x: &[f32], cols: usize) {
        let runs = activation_runs(x, cols);
        let n = x.len();
        self.cols = cols;
        self.q.resize(n, 0);
        self.dx.resize(n / cols * cols.div_ceil(BLOCK), 0.0);
        self.sums.resize(n / GROUP, 0.0);
        for (scale, at, run) in runs {
            let q = &mut self.q[at..][..run.len()];
            let sums = &mut self.sums[at / GROUP..][..run.len() / GROUP];
            // SAFETY: the token proves CPU support; the slices have the run's lengths.
            self.dx[scale] = unsafe { quantize_block(run, q, sums) };
        }
        self.sums32.clear();
        self.sums32
            .extend(self.sums.chunks_exact(2).map(|pair| pair[0] + pair[1]));
    }

    /// The values as f32, for tests.
    #[cfg(test)]
    pub(super) fn values(&self) -> Vec<f32> {
        (0..self.q.len())
            .map(|i| self.dx[super::q8dot::run_of(i, self.cols)] * f32::from(self.q[i]))
            .collect()
    }
}

/// One run's scale `dx`; writes `q = round(x / dx)` (nearest, ties to even) and the
/// 16-element sums of `dx·q`.
///
/// # Safety
/// AVX-512 F/BW/VL; `x` and `q` hold the run's elements (a multiple of 16, at most 256),
/// `sums` one per 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_block(x: &[f32], q: &mut [i16], sums: &mut [f32]) -> f32 {
    assert!(x.len() <= BLOCK && x.len().is_multiple_of(GROUP));
    assert!(q.len() == x.len() && sums.len() == x.len() / GROUP);
    let (dx, inv) = block_scale(x, RANGE as f32);
    for (g, sum) in sums.iter_mut().enumerate() {
        // SAFETY: 16 floats in, 16 i16 out.
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr().add(g * GROUP));
            let r = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));
            _mm256_storeu_si256(
                q.as_mut_ptr().add(g * GROUP).cast(),
                _mm512_cvtepi32_epi16(r),
            );
            // At most 16·32767 in magnitude: exact in f32.
            *sum = dx * _mm512_reduce_add_epi32(r) as f32;
        }
    }
    dx
}

/// A task's weights for one block of columns: rows in groups of 16 (the last padded with
/// zero rows), `len` columns.
#[derive(Default)]
pub(super) struct Panel {
    /// Group `g`, element pair `p`, row `r`: `w[(g·len/2 + p)·16 + r]` holds the row's
    /// elements `2p` and `2p + 1` as two i16 (low half first).
    w: Vec<i32>,
    /// `d[(g·factors + b)·16 + r]`: the factor of the `b`-th run of `P::SCALE_ELEMS`
    /// elements.
    d: Vec<f32>,
    /// `m[(g·len/MIN_GROUP + j)·16 + r]`: the f32 min of min group `j`, `dm·m − c·d·s`
    /// (types with mins only).
    m: Vec<f32>,
}

impl Panel {
    /// Sizes the buffers for `groups` groups of `len` columns, with a factor per
    /// `scale_elems` elements and a min per `min_group` elements (0: none).
    fn fit(&mut self, groups: usize, len: usize, scale_elems: usize, min_group: usize) {
        let lanes = groups * LANES;
        self.w.resize(lanes * len / 2, 0);
        self.d.resize(lanes * len / scale_elems, 0.0);
        self.m
            .resize(lanes * len.checked_div(min_group).unwrap_or(0), 0.0);
    }
}

/// Quantized weights times i16 activations, for one or more matrices of equal `cols`.
pub(super) struct Product<'a> {
    pub x: &'a I16Activations,
    pub n_tokens: usize,
    pub cols: usize,
    pub parts: &'a [Option<Part<'a>>],
}

impl Product<'_> {
    pub(super) fn run(&self, k: Q8Dot, pool: &ThreadPool, panels: &[Mutex<Panel>]) {
        let cols = self.cols;
        assert!(self.x.cols == cols && self.x.q.len() >= self.n_tokens * cols);
        let (rows, work) = job_size(self.parts, self.n_tokens);
        if rows == 0 || self.n_tokens == 0 {
            return;
        }
        let threads = threads_for(pool, work);
        // A panel fits its budget, and every thread gets at least two.
        let len = K_BLOCK.min(cols);
        let rows_per_task = (PANEL_BYTES / (2 * len))
            .min(rows.div_ceil(2 * threads))
            .next_multiple_of(2 * LANES);
        let split = TaskSplit::even(self.parts, rows_per_task);
        run_tasks(pool, threads, self.parts, &split, |part, r0, r1| {
            let WeightData::Quant(qt, w) = part.w.data else {
                unreachable!("the i16 path only takes quantized weights");
            };
            assert!(
                cols.is_multiple_of(qt.block_elems()),
                "whole blocks per row"
            );
            assert_eq!(w.len(), qt.bytes_for(part.w.rows * cols));
            assert!(self.n_tokens * part.w.rows <= part.out.len);
            with_slot(panels, |panel| {
                // SAFETY: the token proves CPU support. Rows r0..r1 of `w` and every token
                // of `x` are in bounds (checked above); tasks own disjoint rows of each
                // part's output, which outlives the product.
                unsafe { self.rows_of(k, qt, w, part.out, part.w.rows, r0..r1, panel) }
            });
        });
    }

    /// # Safety
    /// As [`Product::rows`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_of(
        &self,
        k: Q8Dot,
        qt: QuantType,
        w: &[u8],
        out: OutPtr,
        out_rows: usize,
        rows: std::ops::Range<usize>,
        panel: &mut Panel,
    ) {
        // SAFETY: forwarded.
        unsafe {
            match qt {
                QuantType::Q2K => self.rows::<Q2K>(k, w, out, out_rows, rows, panel),
                QuantType::Q3K => self.rows::<Q3K>(k, w, out, out_rows, rows, panel),
                QuantType::Q4K => self.rows::<Q4K>(k, w, out, out_rows, rows, panel),
                QuantType::Q5K => self.rows::<Q5K>(k, w, out, out_rows, rows, panel),
                QuantType::Q6K => self.rows::<Q6K>(k, w, out, out_rows, rows, panel),
                QuantType::Iq4Xs => self.rows::<Iq4Xs>(k, w, out, out_rows, rows, panel),
                QuantType::Q4_0 => self.rows::<Eight<Q4_0>>(k, w, out, out_rows, rows, panel),
                QuantType::Q4_1 => self.rows::<Eight<Q4_1>>(k, w, out, out_rows, rows, panel),
                QuantType::Q5_0 => self.rows::<Eight<Q5_0>>(k, w, out, out_rows, rows, panel),
                QuantType::Q5_1 => self.rows::<Eight<Q5_1>>(k, w, out, out_rows, rows, panel),
                QuantType::Q8_0 => self.rows::<Eight<Q8_0>>(k, w, out, out_rows, rows, panel),
                QuantType::Iq4Nl => self.rows::<Eight<Iq4Nl>>(k, w, out, out_rows, rows, panel),
            }
        }
    }

    /// Rows `rows` for every token, one block of columns at a time: the block's panel is
    /// unpacked once, then every token tile runs over it, 32 rows at a time.
    ///
    /// # Safety
    /// `w` holds `out_rows` rows of `cols` elements of type `B`, `rows.end <= out_rows`;
    /// `out` holds `n_tokens * out_rows` floats and no other thread touches rows `rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows<B: PanelBlock>(
        &self,
        _k: Q8Dot,
        w: &[u8],
        out: OutPtr,
        out_rows: usize,
        rows: std::ops::Range<usize>,
        panel: &mut Panel,
    ) {
        let cols = self.cols;
        let row_bytes = bytes_of::<B>(cols);
        let n_rows = rows.len();
        let groups = n_rows.div_ceil(LANES);
        assert!(w.len() >= rows.end * row_bytes);
        assert!(self.n_tokens * out_rows <= out.len);
        let mut k0 = 0;
        while k0 < cols {
            let len = K_BLOCK.min(cols - k0);
            let min_group = if B::CENTRED { 0 } else { B::MIN_GROUP };
            panel.fit(groups, len, B::SCALE_ELEMS, min_group);
            for g in 0..groups {
                // Padding rows repeat the last real row's blocks (their factors are zero).
                let blocks: [&[u8]; LANES] = std::array::from_fn(|i| {
                    let r = (g * LANES + i).min(n_rows - 1);
                    &w[(rows.start + r) * row_bytes..][bytes_of::<B>(k0)..][..bytes_of::<B>(len)]
                });
                let real = n_rows - g * LANES;
                // SAFETY: whole blocks of `len` elements; the panel was sized for `groups`
                // groups.
                unsafe { unpack_group::<B>(&blocks, real, g, len, panel) };
            }
            let mut t0 = 0;
            while t0 < self.n_tokens {
                let nt = (self.n_tokens - t0).min(TOKENS);
                let mut g = 0;
                while g < groups {
                    let ng = (groups - g).min(2);
                    let at = Tile {
                        t0,
                        k0,
                        len,
                        group: g,
                        row: rows.start + g * LANES,
                        valid: (n_rows - g * LANES).min(ng * LANES),
                        accumulate: k0 > 0,
                    };
                    // SAFETY: forwarded; the tile's shape becomes constants, so its loops
                    // unroll and its accumulators stay in registers.
                    unsafe {
                        match (nt, ng) {
                            (6, 2) => self.tile::<B, 6, 2>(panel, &at, out, out_rows),
                            (5, 2) => self.tile::<B, 5, 2>(panel, &at, out, out_rows),
                            (4, 2) => self.tile::<B, 4, 2>(panel, &at, out, out_rows),
                            (3, 2) => self.tile::<B, 3, 2>(panel, &at, out, out_rows),
                            (2, 2) => self.tile::<B, 2, 2>(panel, &at, out, out_rows),
                            (_, 2) => self.tile::<B, 1, 2>(panel, &at, out, out_rows),
                            (6, _) => self.tile::<B, 6, 1>(panel, &at, out, out_rows),
                            (5, _) => self.tile::<B, 5, 1>(panel, &at, out, out_rows),
                            (4, _) => self.tile::<B, 4, 1>(panel, &at, out, out_rows),
                            (3, _) => self.tile::<B, 3, 1>(panel, &at, out, out_rows),
                            (2, _) => self.tile::<B, 2, 1>(panel, &at, out, out_rows),
                            (_, _) => self.tile::<B, 1, 1>(panel, &at, out, out_rows),
                        }
                    }
                    g += ng;
                }
                t0 += nt;
            }
            k0 += len;
        }
    }

    /// `NT` tokens from `at.t0` times the panel's `NG` groups from `at.group`, over the
    /// panel's columns, written (or added) to `out`.
    ///
    /// # Safety
    /// As [`Product::rows`]; the panel holds this tile's groups for `at.len` columns from
    /// `at.k0`, `at.t0 + NT <= n_tokens`, and AVX-512 F/BW/VL/VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // index loops over the const-size register tile
    unsafe fn tile<B: PanelBlock, const NT: usize, const NG: usize>(
        &self,
        panel: &Panel,
        at: &Tile,
        out: OutPtr,
        out_rows: usize,
    ) {
        let (cols, len) = (self.cols, at.len);
        // Runs of 256 (the last may be shorter: 32-element types only).
        let blocks = len.div_ceil(BLOCK);
        let runs_per_row = cols.div_ceil(BLOCK);
        // Constants, so the loop over a flush interval's pairs has a known trip count.
        let flush = B::FLUSH;
        let scaled_flush = B::SCALE_ELEMS < BLOCK;
        let factors = len / B::SCALE_ELEMS;
        let pairs = len / 2;
        assert!(panel.w.len() >= (at.group + NG) * pairs * LANES);
        assert!(panel.d.len() >= (at.group + NG) * factors * LANES);
        let min_groups = len / B::MIN_GROUP;
        assert!(B::CENTRED || panel.m.len() >= (at.group + NG) * min_groups * LANES);
        // The activations' sums per min group.
        let xs = if B::MIN_GROUP == 2 * GROUP {
            &self.x.sums32
        } else {
            &self.x.sums
        };
        assert!(B::CENTRED || (at.t0 + NT) * cols <= xs.len() * B::MIN_GROUP);
        let xs = xs.as_ptr();
        assert!((at.t0 + NT) * cols <= self.x.q.len());
        let wp = panel.w.as_ptr();
        let dp = panel.d.as_ptr();
        let mp = panel.m.as_ptr();
        // Token t's pairs for this column block, as i32.
        let xq: [*const i32; NT] =
            std::array::from_fn(|t| self.x.q[(at.t0 + t) * cols + at.k0..].as_ptr().cast());
        let mut acc = [[_mm512_setzero_ps(); NG]; NT];
        for b in 0..blocks {
            // The block's sums, before its factor `d·dx`: the conversions add here with
            // `vaddps`, which Zen 4 runs beside the integer products, and the factor
            // multiplies once per block.
            let mut block = [[_mm512_setzero_ps(); NG]; NT];
            let mut p0 = b * BLOCK / 2;
            while p0 < ((b + 1) * BLOCK).min(len) / 2 {
                let mut sum = [[_mm512_setzero_si512(); NG]; NT];
                for p in p0..p0 + flush / 2 {
                    // SAFETY (all panel and activation reads): within the lengths asserted
                    // above.
                    let wv: [__m512i; NG] = std::array::from_fn(|g| unsafe {
                        _mm512_loadu_si512(wp.add(((at.group + g) * pairs + p) * LANES).cast())
                    });
                    for t in 0..NT {
                        let xv = _mm512_set1_epi32(unsafe { xq[t].add(p).read_unaligned() });
                        for g in 0..NG {
                            sum[t][g] = dpwssd(sum[t][g], wv[g], xv);
                        }
                    }
                }
                if scaled_flush {
                    // A factor per flush interval (the 32-element types): its sums multiply
                    // by it on the way into the block's.
                    let f = 2 * p0 / B::SCALE_ELEMS;
                    // SAFETY: as above.
                    let d: [__m512; NG] = std::array::from_fn(|g| unsafe {
                        _mm512_loadu_ps(dp.add(((at.group + g) * factors + f) * LANES))
                    });
                    for t in 0..NT {
                        for g in 0..NG {
                            let v = _mm512_cvtepi32_ps(sum[t][g]);
                            block[t][g] = _mm512_fmadd_ps(v, d[g], block[t][g]);
                        }
                    }
                } else {
                    for t in 0..NT {
                        for g in 0..NG {
                            let v = _mm512_cvtepi32_ps(sum[t][g]);
                            block[t][g] = _mm512_add_ps(block[t][g], v);
                        }
                    }
                }
                p0 += flush / 2;
            }
            for t in 0..NT {
                let dx = self.x.dx[(at.t0 + t) * runs_per_row + at.k0 / BLOCK + b];
                for g in 0..NG {
                    let scale = if scaled_flush {
                        _mm512_set1_ps(dx)
                    } else {
                        // SAFETY: as above.
                        let d = unsafe {
                            _mm512_loadu_ps(dp.add(((at.group + g) * factors + b) * LANES))
                        };
                        _mm512_mul_ps(d, _mm512_set1_ps(dx))
                    };
                    acc[t][g] = _mm512_fmadd_ps(block[t][g], scale, acc[t][g]);
                }
            }
            if !B::CENTRED {
                for j in b * BLOCK / B::MIN_GROUP..((b + 1) * BLOCK).min(len) / B::MIN_GROUP {
                    let mv: [__m512; NG] = std::array::from_fn(|g| unsafe {
                        _mm512_loadu_ps(mp.add(((at.group + g) * min_groups + j) * LANES))
                    });
                    for t in 0..NT {
                        let at = ((at.t0 + t) * cols + at.k0) / B::MIN_GROUP + j;
                        let xs = _mm512_set1_ps(unsafe { *xs.add(at) });
                        for g in 0..NG {
                            acc[t][g] = _mm512_fnmadd_ps(mv[g], xs, acc[t][g]);
                        }
                    }
                }
            }
        }
        for t in 0..NT {
            for g in 0..NG {
                let valid = at.valid.saturating_sub(g * LANES).min(LANES);
                if valid == 0 {
                    continue;
                }
                let mask = super::avx512::lanes(valid);
                let i = (at.t0 + t) * out_rows + at.row + g * LANES;
                assert!(i + valid <= out.len);
                // SAFETY: in bounds (checked); this task alone writes these rows.
                unsafe {
                    let o = out.ptr.add(i);
                    let v = if at.accumulate {
                        _mm512_add_ps(acc[t][g], _mm512_maskz_loadu_ps(mask, o))
                    } else {
                        acc[t][g]
                    };
                    _mm512_mask_storeu_ps(o, mask, v);
                }
            }
        }
    }
}

/// `vpdpwssd`: `acc` plus, in each i32 lane, the sum of its two i16 products of `a` and `b`.
///
/// Written as assembly because LLVM's machine combiner rewrites a run of the intrinsic
/// (`_mm512_dpwssd_epi32`) it has unrolled into `vpmaddwd` + `vpaddd` pairs, twice the
/// instructions for the same work: with 16-element flush intervals (Q6_K, IQ4_XS) the whole
/// inner loop was rewritten, and those types ran 22 % slower per multiply-add than Q4_K.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: a register-only instruction of a feature this function requires.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Where a micro-kernel tile sits: its first token, its panel's columns (`k0..k0 + len` of
/// the matrix), its first panel group and that group's first row in the output, how many of
/// its rows are real (the rest are padding), and whether it adds to the output.
struct Tile {
    t0: usize,
    k0: usize,
    len: usize,
    group: usize,
    row: usize,
    valid: usize,
    accumulate: bool,
}

/// Bytes of `elems` elements (whole blocks) of type `B`.
fn bytes_of<B: PanelBlock>(elems: usize) -> usize {
    elems / B::BLOCK_ELEMS * B::BLOCK_BYTES
}

/// A weight type with panels here, 256 elements of a row at a time.
pub(super) trait PanelBlock {
    /// Elements and bytes of one block of the type.
    const BLOCK_ELEMS: usize;
    const BLOCK_BYTES: usize;
    /// Elements per factor `d`: 256, or 32 for the 32-element types.
    const SCALE_ELEMS: usize;
    /// Elements whose products are summed in i32 before a conversion to f32: a power of two
    /// that divides `SCALE_ELEMS` and keeps `FLUSH·|w|·RANGE < 2^31`.
    const FLUSH: usize;
    /// The weights need no min term.
    const CENTRED: bool;
    /// Elements that share one min.
    const MIN_GROUP: usize;

    /// `elems` elements of a row (256, or fewer at a row's end: whole blocks) as i16
    /// weights in element order into `values`, the factors of their runs of `SCALE_ELEMS`
    /// into `d`, and for types with mins each 16 elements' f32 min (subtracted, times the
    /// activations' sum) into `dm_m`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `bytes` holds `elems` elements' whole blocks.
    unsafe fn unpack(
        elems: usize,
        bytes: &[u8],
        values: &mut [i16; BLOCK],
        d: &mut [f32; BLOCK / 32],
        dm_m: &mut [f32; BLOCK / GROUP],
    );
}

impl<B: SuperBlock> PanelBlock for B {
    const BLOCK_ELEMS: usize = BLOCK;
    const BLOCK_BYTES: usize = B::BYTES;
    const SCALE_ELEMS: usize = BLOCK;
    const FLUSH: usize = flush_elems(B::MAX_WEIGHT);
    const CENTRED: bool = B::CENTRED;
    const MIN_GROUP: usize = B::MIN_GROUP;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unpack(
        elems: usize,
        bytes: &[u8],
        values: &mut [i16; BLOCK],
        d: &mut [f32; BLOCK / 32],
        dm_m: &mut [f32; BLOCK / GROUP],
    ) {
        assert_eq!(elems, BLOCK, "rows of 256-element types are whole blocks");
        // SAFETY: forwarded: one whole block.
        d[0] = unsafe { unpack_block::<B>(bytes, values, dm_m) };
    }
}

/// Eight blocks of a 32-element type: 256 elements. Their quants go into the panel as they
/// are, centred by the type's offset (`u − 8` for Q4_0, `u − 16` for Q5_0, the signed values
/// of Q8_0 and IQ4_NL), or unsigned for the types with a min, whose min term takes the
/// stored `m`; each block keeps its `d`, by which its 32 elements' sums multiply (the flush
/// interval is the block: `|w| <= 128`, so 32 products stay under 2^28).
pub(super) struct Eight<B>(PhantomData<B>);

impl<B: Block32> PanelBlock for Eight<B> {
    const BLOCK_ELEMS: usize = 32;
    const BLOCK_BYTES: usize = B::BYTES;
    const SCALE_ELEMS: usize = 32;
    const FLUSH: usize = 32;
    const CENTRED: bool = !B::HAS_MIN;
    const MIN_GROUP: usize = 32;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unpack(
        elems: usize,
        bytes: &[u8],
        values: &mut [i16; BLOCK],
        d: &mut [f32; BLOCK / 32],
        dm_m: &mut [f32; BLOCK / GROUP],
    ) {
        let offset = _mm512_set1_epi16(B::OFFSET as i16);
        for (j, d) in d.iter_mut().enumerate().take(elems / 32) {
            let block = &bytes[j * B::BYTES..][..B::BYTES];
            let half = |at: usize| half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
            *d = half(0);
            if B::HAS_MIN {
                let m = half(2);
                dm_m[2 * j] = -m;
                dm_m[2 * j + 1] = -m;
            }
            // SAFETY: a whole block; 32 i16 stored at element 32j of 256.
            unsafe {
                let u = _mm512_cvtepu8_epi16(B::quants(block));
                let v = _mm512_sub_epi16(u, offset);
                _mm512_storeu_si512(values.as_mut_ptr().add(32 * j).cast(), v);
            }
        }
    }
}

/// The most elements (a power of two, at most a block) whose products with weights of
/// magnitude up to `max_weight` sum within i32: `flush·max_weight·RANGE < 2^31`.
const fn flush_elems(max_weight: i32) -> usize {
    let mut f = BLOCK;
    while f as i64 * max_weight as i64 * RANGE as i64 >= 1 << 31 {
        f /= 2;
    }
    f
}

/// Unpacks a group of 16 rows' blocks (`len` elements each) into panel group `g`: each
/// row's blocks unpacked to i16 in element order, then 16 rows' element pairs transposed so
/// that each pair's 16 rows lie side by side. Rows from `real` on are padding: they get zero
/// factors, so whatever their weights, they add nothing.
///
/// # Safety
/// AVX-512 F/BW/VL; each of `rows` holds the whole blocks of `len` elements (a multiple of
/// 256, or of 32 for the 32-element types); the panel fits group `g`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn unpack_group<B: PanelBlock>(
    rows: &[&[u8]; LANES],
    real: usize,
    g: usize,
    len: usize,
    p: &mut Panel,
) {
    // Runs of 256 elements, the last of `len` may be shorter (whole blocks).
    let n_blocks = len.div_ceil(BLOCK);
    let pairs = len / 2;
    assert!(p.w.len() >= (g + 1) * pairs * LANES);
    let per_block = BLOCK / B::SCALE_ELEMS;
    let factors = len / B::SCALE_ELEMS;
    let mut values = [[0i16; BLOCK]; LANES];
    let mut d = [0f32; BLOCK / 32];
    let mut dm_m = [0f32; BLOCK / GROUP];
    for b in 0..n_blocks {
        let elems = (len - b * BLOCK).min(BLOCK);
        for (lane, values) in values.iter_mut().enumerate() {
            let block = &rows[lane][bytes_of::<B>(b * BLOCK)..][..bytes_of::<B>(elems)];
            let real = lane < real;
            // SAFETY: whole blocks of `elems` elements.
            unsafe { B::unpack(elems, block, values, &mut d, &mut dm_m) };
            for (f, &d) in d[..elems / B::SCALE_ELEMS].iter().enumerate() {
                p.d[(g * factors + b * per_block + f) * LANES + lane] = if real { d } else { 0.0 };
            }
            if !B::CENTRED {
                // `dm_m` has one value per 16 elements; a min group of 32 takes the first of
                // its two (they are equal).
                let per = B::MIN_GROUP / GROUP;
                let groups = len / B::MIN_GROUP;
                let run_groups = elems / B::MIN_GROUP;
                for (j, &m) in dm_m.iter().step_by(per).take(run_groups).enumerate() {
                    let at = g * groups + b * (BLOCK / B::MIN_GROUP) + j;
                    p.m[at * LANES + lane] = if real { m } else { 0.0 };
                }
            }
        }
        // Sixteen rows' 16 pairs at a time: row r's pairs in register r become pair i's
        // rows in register i.
        for c in 0..elems / 32 {
            // SAFETY: each row holds `elems` i16, 32 of them from 32c; the stores stay inside
            // group g (asserted above).
            unsafe {
                let rows = std::array::from_fn(|r| {
                    _mm512_loadu_si512(values[r].as_ptr().add(32 * c).cast())
                });
                for (i, v) in transpose16(rows).into_iter().enumerate() {
                    let at = (g * pairs + b * BLOCK / 2 + 16 * c + i) * LANES;
                    _mm512_storeu_si512(p.w.as_mut_ptr().add(at).cast(), v);
                }
            }
        }
    }
}

/// One block as i16 weights in element order (see the module's documentation) into
/// `values`; returns its `d`, and for types with mins writes each 16 elements' f32 min into
/// `dm_m`.
///
/// # Safety
/// AVX-512 F/BW/VL; `block` is one whole block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn unpack_block<B: SuperBlock>(
    block: &[u8],
    values: &mut [i16; BLOCK],
    dm_m: &mut [f32; BLOCK / GROUP],
) -> f32 {
    let mut scales = [0i16; BLOCK / GROUP];
    let mut mins = [0i16; BLOCK / GROUP];
    // SAFETY: a whole block; the stores write the local arrays' exact sizes.
    unsafe {
        let wb = B::unpack(block);
        _mm256_storeu_si256(scales.as_mut_ptr().cast(), _mm512_cvtepi32_epi16(wb.scale));
        _mm256_storeu_si256(mins.as_mut_ptr().cast(), _mm512_cvtepi32_epi16(wb.min));
        for (q, u) in wb.u.iter().enumerate() {
            for h in 0..2 {
                // Elements 64q + 32h.., groups 4q + 2h and 4q + 2h + 1.
                let bytes = if h == 0 {
                    _mm512_castsi512_si256(*u)
                } else {
                    _mm512_extracti64x4_epi64::<1>(*u)
                };
                let v = _mm512_cvtepu8_epi16(bytes);
                let v = _mm512_sub_epi16(v, _mm512_set1_epi16(B::RECENTRE));
                let gi = 4 * q + 2 * h;
                let per_group = |s: &[i16; 16]| {
                    _mm512_inserti64x4::<1>(_mm512_set1_epi16(s[gi]), _mm256_set1_epi16(s[gi + 1]))
                };
                let mut v = _mm512_mullo_epi16(v, per_group(&scales));
                if B::CENTRED {
                    v = _mm512_sub_epi16(v, per_group(&mins));
                }
                _mm512_storeu_si512(values.as_mut_ptr().add(64 * q + 32 * h).cast(), v);
            }
        }
        if !B::CENTRED {
            // `d·s·u − dm·m = d·s·(u − RECENTRE) − (dm·m − RECENTRE·d·s)`.
            let m = _mm512_mul_ps(_mm512_cvtepi32_ps(wb.min), _mm512_set1_ps(wb.dm));
            let shift = f32::from(B::RECENTRE) * wb.d;
            let s = _mm512_mul_ps(_mm512_cvtepi32_ps(wb.scale), _mm512_set1_ps(shift));
            _mm512_storeu_ps(dm_m.as_mut_ptr(), _mm512_sub_ps(m, s));
        }
        wb.d
    }
}

/// The transpose of a 16 x 16 matrix of 32-bit elements, one row per register.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn transpose16(a: [__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane: rows 2i and 2i + 1 interleaved, then rows 4i..4i + 4, so
    // that u[4i + j] holds, in lane l, column 4l + j of rows 4i..4i + 4.
    let t: [__m512i; 16] = std::array::from_fn(|k| {
        let (x, y) = (a[k & !1], a[k | 1]);
        if k % 2 == 0 {
            _mm512_unpacklo_epi32(x, y)
        } else {
            _mm512_unpackhi_epi32(x, y)
        }
    });
    let u: [__m512i; 16] = std::array::from_fn(|k| {
        let (i, j) = (k / 4, k % 4);
        let (x, y) = (t[4 * i + j / 2], t[4 * i + 2 + j / 2]);
        if j % 2 == 0 {
            _mm512_unpacklo_epi64(x, y)
        } else {
            _mm512_unpackhi_epi64(x, y)
        }
    });
    // Column 4l + j gathers lane l of u[j], u[4 + j], u[8 + j], u[12 + j].
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let even_a = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[j], u[4 + j]);
        let odd_a = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[j], u[4 + j]);
        let even_b = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[8 + j], u[12 + j]);
        let odd_b = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(even_a, even_b);
        out[8 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(even_a, even_b);
        out[4 + j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(odd_a, odd_b);
        out[12 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(odd_a, odd_b);
    }
    out
}
