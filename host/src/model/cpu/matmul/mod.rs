//! Matrix products of f32 activations with weights in their stored dtype.
//!
//! Every product is `out[t, r] = sum_k x[t, k] * w[r, k]`: both operands are contiguous along
//! `k`, so the micro-kernels work in dot-product form, a tile of tokens times a tile of weight
//! rows held in vector accumulators and reduced horizontally at the end. Weights are widened
//! to f32 (bf16: shift left by 16; f16: a hardware conversion) and all arithmetic is f32 FMA.
//!
//! Two schedules:
//! - few tokens (decode): one token tile streams the weights straight from memory, widening
//!   them in registers. This is bandwidth bound; the threads split the rows.
//! - many tokens (prefill): each task takes a panel of rows and, one block of columns at a
//!   time, widens that block into per-thread scratch (it then stays in L2) and runs every
//!   token tile over it, so each weight is read from memory and widened once.
//!
//! The instruction set is picked at run time: AVX-512, else AVX2 + FMA + F16C, else portable
//! scalar code (also the only path on non-x86 targets).

#[cfg(target_arch = "x86_64")]
mod avx2;
// AVX-512 intrinsics and target features are stable since Rust 1.89, above the workspace's
// declared `rust-version`: this module is what makes the crate need 1.89.
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod bf16dot;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod block32;
mod dequant;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod dequant_avx512;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod half_input;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod i16_panels;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod q8dot;
mod scalar;
mod tasks;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};

use super::pool::ThreadPool;
use crate::model::quant::QuantType;
use tasks::{run_tasks, TaskSplit};

/// A weight matrix's elements in their stored dtype (bf16 and f16 as raw bits, quantized
/// types as their blocks; a quantized matrix's rows are whole blocks).
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
    Quant(QuantType, &'a [u8]),
}

impl<'a> WeightData<'a> {
    fn elems(&self) -> usize {
        match self {
            WeightData::F32(d) => d.len(),
            WeightData::Bf16(d) | WeightData::F16(d) => d.len(),
            WeightData::Quant(qt, d) => d.len() / qt.block_bytes() * qt.block_elems(),
        }
    }

    /// The elements from `start` on.
    fn tail_from(self, start: usize) -> WeightData<'a> {
        match self {
            WeightData::F32(d) => WeightData::F32(&d[start..]),
            WeightData::Bf16(d) => WeightData::Bf16(&d[start..]),
            WeightData::F16(d) => WeightData::F16(&d[start..]),
            WeightData::Quant(qt, d) => {
                assert!(
                    start.is_multiple_of(qt.block_elems()),
                    "not at a block start"
                );
                WeightData::Quant(qt, &d[qt.bytes_for(start)..])
            }
        }
    }
}

/// A row-major `[rows, cols]` weight matrix (HF `Linear.weight` layout: `[out, in]`).
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub data: WeightData<'a>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix<'_> {
    /// Element `(r, c)` as f32.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let i = r * self.cols + c;
        match self.data {
            WeightData::F32(d) => d[i],
            WeightData::Bf16(d) => bf16_to_f32(d[i]),
            WeightData::F16(d) => half::f16::from_bits(d[i]).to_f32(),
            WeightData::Quant(qt, d) => {
                let be = qt.block_elems();
                let start = qt.bytes_for(i - i % be);
                let mut block = [0.0f32; 256];
                dequant::dequantize(qt, &d[start..][..qt.block_bytes()], &mut block[..be]);
                block[i % be]
            }
        }
    }

    /// Writes row `r` as f32 into `out` (`out.len() == cols`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range ({} rows)", self.rows);
        assert_eq!(out.len(), self.cols, "output length must equal cols");
        let src = self.data.tail_from(r * self.cols);
        if let WeightData::Quant(..) = src {
            return dequant::widen_quant(src, self.cols, 1, self.cols, out);
        }
        match Isa::detect() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => widen_with(avx512::Avx512::new(), src, self.cols, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => widen_with(avx2::Avx2::new(), src, self.cols, out),
            _ => scalar::Scalar.widen(src, self.cols, 1, self.cols, out),
        }
    }
}

fn widen_with<K: Kernels>(kernels: Option<K>, src: WeightData, cols: usize, out: &mut [f32]) {
    match kernels {
        Some(k) => k.widen(src, cols, 1, cols, out),
        None => scalar::Scalar.widen(src, cols, 1, cols, out),
    }
}

/// bf16 bits to f32: bf16 is the top half of an f32.
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// An instruction-set level the kernels can run at, ordered from least to most capable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, whatever the target.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 F, BW and VL.
    Avx512,
}

/// The detected level, cached: 0 until first detection, else `Isa as u8 + 1`.
static DETECTED: AtomicU8 = AtomicU8::new(0);

impl Isa {
    /// The best level this CPU supports (detected once, then cached).
    #[inline]
    pub fn detect() -> Isa {
        match DETECTED.load(Ordering::Relaxed) {
            1 => Isa::Scalar,
            2 => Isa::Avx2,
            3 => Isa::Avx512,
            _ => {
                let isa = Self::probe();
                DETECTED.store(isa as u8 + 1, Ordering::Relaxed);
                isa
            }
        }
    }

    fn probe() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::Avx512::new().is_some() {
                return Isa::Avx512;
            }
            if avx2::Avx2::new().is_some() {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every level this CPU can run, lowest first (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&isa| isa <= best)
            .collect()
    }
}

/// How matrix products with 16-bit and quantized weights compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    /// Weights widened to f32, f32 activations, f32 multiply-adds: reproduces Hugging Face
    /// transformers' float32 computation.
    Exact,
    /// On CPUs with AVX-512, rounded activations:
    /// - bf16 weights, with AVX512-BF16: the q/k/v, o, gate and up projections round their
    ///   input to bf16 ([`Precision::Bf16`]), as llama.cpp's bf16 path does; the down
    ///   projection splits its input into two bf16 parts ([`Precision::Bf16Split`]) when
    ///   several tokens go through it, and rounds it to f16 for one token (decode).
    /// - f16 weights: every projection of one token rounds its input to f16, as llama.cpp's
    ///   f16 path does; several tokens compute as `Exact`.
    /// - Quantized weights (every GGUF type cllm reads), with AVX512-VNNI: products of up to
    ///   16 tokens (decode), the vocabulary projection's too, hold their input as two signed
    ///   bytes per element (`hi + lo / 256` times a scale per run of 256 elements, a row's
    ///   last run possibly shorter, within 2^-16 of the run's largest) and multiply the
    ///   stored quants as integers. More tokens (prefill) hold it as i16 (times a scale per
    ///   run, the same 2^-16) and
    ///   multiply i16 weights: the K-quants' and IQ4_XS's with their group scales folded in,
    ///   the 32-element types' (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) as stored, with each
    ///   block's factor applied to its sums.
    ///
    /// Other vocabulary projections, attention, norms, f32 weights and CPUs without AVX-512
    /// compute exactly as `Exact`.
    #[default]
    Fast,
}

impl Numerics {
    pub fn name(self) -> &'static str {
        match self {
            Numerics::Exact => "exact",
            Numerics::Fast => "fast",
        }
    }

    pub fn parse(s: &str) -> Option<Numerics> {
        match s {
            "exact" => Some(Numerics::Exact),
            "fast" => Some(Numerics::Fast),
            _ => None,
        }
    }

    /// The arithmetic of the vocabulary projection with weights `data`. It stays exact in
    /// every mode, except for quantized weights with an 8-bit kernel under `Fast`: rounding
    /// its input to bf16 moves the logits by up to ~2e-3 relative, which the fast mode's
    /// stated tolerance (first-step logits within 2e-2 of the f32 reference) cannot afford on
    /// top of the layers' own error, while the two-byte activations of the 8-bit kernels err
    /// by at most 2^-16 of each 256 elements' largest (see `q8dot`).
    pub fn head_precision(self, data: &WeightData) -> Precision {
        let (main, _) = self.precisions();
        if main.uses_integer_dot(data) {
            main
        } else {
            Precision::F32
        }
    }

    /// The arithmetic of the q/k/v, o, gate and up projections, and of the down projection.
    pub fn precisions(self) -> (Precision, Precision) {
        match self {
            Numerics::Exact => (Precision::F32, Precision::F32),
            Numerics::Fast => (Precision::Bf16, Precision::Bf16Split),
        }
    }
}

/// The arithmetic of one product with bf16 weights (other weights always compute in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Weights widened to f32, f32 activations and multiply-adds.
    F32,
    /// Activations rounded to bf16, bf16 pair products summed in f32 (AVX512-BF16).
    Bf16,
    /// Activations split into two bf16 parts, `hi = bf16(x)` and `lo = bf16(x - hi)`, each
    /// multiplied as in `Bf16`: x keeps 16 significant bits (relative error below 2^-16), at
    /// twice `Bf16`'s multiply-adds but no wider weights.
    Bf16Split,
}

impl Precision {
    /// Whether a product of one token with `data` rounds its input to f16 on this CPU
    /// (f16 weights in any fast precision; bf16 weights with `Bf16Split`).
    pub fn uses_half_input(self, data: &WeightData) -> bool {
        let fits = match data {
            WeightData::F32(_) => false,
            WeightData::F16(_) => self != Precision::F32,
            WeightData::Bf16(_) => self == Precision::Bf16Split,
            WeightData::Quant(..) => false,
        };
        fits && Isa::detect() == Isa::Avx512
    }

    /// Whether products with `data` multiply integers on this CPU: up to [`q8dot::TOKENS`]
    /// tokens with two-byte activations (`q8dot`), more with i16 activations and panels
    /// (`i16_panels`).
    pub fn uses_integer_dot(self, data: &WeightData) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self != Precision::F32
                && matches!(data, WeightData::Quant(qt, _) if q8dot::supports(*qt))
                && Isa::detect() == Isa::Avx512
                && q8_dot_supported()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = data;
            false
        }
    }

    /// Whether products with `data` take the bf16 path on this CPU.
    pub fn uses_bf16_dot(self, data: &WeightData) -> bool {
        self != Precision::F32
            && matches!(data, WeightData::Bf16(_))
            && Isa::detect() == Isa::Avx512
            && bf16_dot_supported()
    }
}

/// `dst[i]` = `src[i]` clamped to f16's range (+-65504) and rounded to f16 (nearest even),
/// as IEEE bits; with AVX-512 when the CPU has it. Lengths must be equal.
pub(crate) fn round_to_f16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = avx512::Avx512::new() {
        return half_input::round(cpu, src, dst);
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(s.clamp(-65504.0, 65504.0)).to_bits();
    }
}

/// Whether this CPU has AVX512-VNNI (detected once).
#[cfg(target_arch = "x86_64")]
fn q8_dot_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| q8dot::Q8Dot::new().is_some())
}

/// Whether this CPU has AVX512-BF16 (detected once).
pub fn bf16_dot_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(|| bf16dot::Bf16Dot::new().is_some())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Reusable buffers for [`matmul`], owned by the caller so the hot loop never allocates.
///
/// One f32 panel per thread; a task locks a free one for its duration. `x_bf16` holds the
/// activations rounded to bf16 for the bf16 paths, `x_bf16_lo` the remainders for the split one,
/// `x_f16` the activations rounded to f16 for one-token products that take them so, `x_q8`
/// the activations as two bytes for the quantized decode path, `x_i16` as i16 for the
/// quantized prefill path, whose weight panels are in `i16_panels` (one per thread).
#[derive(Default)]
pub struct MatmulScratch {
    panels: Vec<Mutex<Vec<f32>>>,
    x_bf16: Vec<u16>,
    x_bf16_lo: Vec<u16>,
    x_f16: Vec<u16>,
    #[cfg(target_arch = "x86_64")]
    x_q8: q8dot::Q8Activations,
    #[cfg(target_arch = "x86_64")]
    x_i16: i16_panels::I16Activations,
    #[cfg(target_arch = "x86_64")]
    i16_panels: Vec<Mutex<i16_panels::Panel>>,
}

/// One product of a [`matmul_group`]: a weight matrix and where its result goes.
pub struct GroupPart<'a, 'b> {
    pub w: Matrix<'a>,
    pub out: &'b mut [f32],
}

/// Several products of the same activations (`x`, `n_tokens` rows), run as one job so the
/// threads split all their rows at once (one wake-up and one wait instead of one per matrix).
pub fn matmul_group<'a, 'b>(
    pool: &ThreadPool,
    precision: Precision,
    x: &[f32],
    n_tokens: usize,
    parts: impl IntoIterator<Item = GroupPart<'a, 'b>>,
    scratch: &mut MatmulScratch,
) {
    let mut specs = [None; MAX_PARTS];
    let mut count = 0;
    for part in parts {
        assert!(count < MAX_PARTS, "at most {MAX_PARTS} products per group");
        check_shapes(x, n_tokens, &part.w, part.out);
        specs[count] = Some(Part {
            w: part.w,
            out: OutPtr::new(part.out),
        });
        count += 1;
    }
    let specs = &specs[..count];
    #[cfg(target_arch = "x86_64")]
    if fast_path(pool, precision, x, n_tokens, specs, scratch) {
        return;
    }
    // Other targets have no fast path: `precision` only decides on x86-64.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = precision;
    let product = Product {
        x,
        n_tokens,
        parts: specs,
    };
    product.dispatch(Isa::detect(), pool, scratch);
}

/// Runs a [`matmul_group`] on a path that rounds the activations, when `precision`, every
/// part's weights, the token count and the CPU allow one; returns whether it ran.
#[cfg(target_arch = "x86_64")]
fn fast_path(
    pool: &ThreadPool,
    precision: Precision,
    x: &[f32],
    n_tokens: usize,
    specs: &[Option<Part>],
    scratch: &mut MatmulScratch,
) -> bool {
    let Some(cols) = specs.iter().flatten().next().map(|p| p.w.cols) else {
        return false;
    };
    let every = |uses: fn(Precision, &WeightData) -> bool| {
        specs
            .iter()
            .flatten()
            .all(|p| uses(precision, &p.w.data) && p.w.cols > 0)
    };
    if n_tokens == 1 && every(Precision::uses_half_input) {
        if let Some(cpu) = avx512::Avx512::new() {
            let xh = &mut scratch.x_f16;
            if xh.len() < x.len() {
                xh.resize(x.len(), 0);
            }
            half_input::round(cpu, x, &mut xh[..x.len()]);
            half_input::run(cpu, pool, &xh[..x.len()], specs);
            return true;
        }
    }
    if n_tokens <= q8dot::TOKENS && every(Precision::uses_integer_dot) {
        if let Some(k) = q8dot::Q8Dot::new() {
            scratch.x_q8.quantize(k, x, cols);
            let product = q8dot::Product {
                x: &scratch.x_q8,
                n_tokens,
                cols,
                parts: specs,
            };
            product.run(k, pool);
            return true;
        }
    }
    if every(Precision::uses_integer_dot) {
        if let Some(k) = q8dot::Q8Dot::new() {
            scratch.x_i16.quantize(k, x, cols);
            let slots = &mut scratch.i16_panels;
            if slots.len() < pool.threads() {
                slots.resize_with(pool.threads(), Default::default);
            }
            let product = i16_panels::Product {
                x: &scratch.x_i16,
                n_tokens,
                cols,
                parts: specs,
            };
            product.run(k, pool, slots);
            return true;
        }
    }
    if every(Precision::uses_bf16_dot) {
        if let Some(k) = bf16dot::Bf16Dot::new() {
            let xb = &mut scratch.x_bf16;
            if xb.len() < x.len() {
                xb.resize(x.len(), 0);
            }
            let lo = if precision == Precision::Bf16Split {
                let lo = &mut scratch.x_bf16_lo;
                if lo.len() < x.len() {
                    lo.resize(x.len(), 0);
                }
                k.split_to_bf16(x, &mut xb[..x.len()], &mut lo[..x.len()]);
                Some(&lo[..x.len()])
            } else {
                k.round_to_bf16(x, &mut xb[..x.len()]);
                None
            };
            let product = bf16dot::Product {
                x: &xb[..x.len()],
                x_lo: lo,
                n_tokens,
                cols,
                parts: specs,
            };
            product.run(k, pool);
            return true;
        }
    }
    false
}

/// Most products in one [`matmul_group`] (q, k and v).
pub const MAX_PARTS: usize = 3;

fn check_shapes(x: &[f32], n_tokens: usize, w: &Matrix, out: &[f32]) {
    assert_eq!(x.len(), n_tokens * w.cols, "x must hold n_tokens * cols");
    assert_eq!(
        out.len(),
        n_tokens * w.rows,
        "out must hold n_tokens * rows"
    );
    assert_eq!(
        w.data.elems(),
        w.rows * w.cols,
        "weight data must hold rows * cols elements"
    );
}

/// `out[t * w.rows + r] = sum_k x[t * w.cols + k] * w[r, k]` for every token `t < n_tokens`,
/// computed exactly (f32 arithmetic).
pub fn matmul(
    pool: &ThreadPool,
    x: &[f32],
    n_tokens: usize,
    w: &Matrix,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    matmul_with(Isa::detect(), pool, x, n_tokens, w, out, scratch);
}

/// [`matmul`] at a chosen instruction-set level (capped at what the CPU supports).
pub fn matmul_with(
    isa: Isa,
    pool: &ThreadPool,
    x: &[f32],
    n_tokens: usize,
    w: &Matrix,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    check_shapes(x, n_tokens, w, out);
    let parts = [Some(Part {
        w: *w,
        out: OutPtr::new(out),
    })];
    let product = Product {
        x,
        n_tokens,
        parts: &parts,
    };
    product.dispatch(isa, pool, scratch);
}

/// Dot product of two equal-length f32 slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` saw the CPU support AVX-512 F/BW/VL.
        Isa::Avx512 => unsafe { avx512::dot(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` saw the CPU support AVX2 and FMA.
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        _ => scalar::dot(a, b),
    }
}

/// `y += alpha * x`.
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` saw the CPU support AVX-512 F/BW/VL.
        Isa::Avx512 => unsafe { avx512::axpy(y, alpha, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` saw the CPU support AVX2 and FMA.
        Isa::Avx2 => unsafe { avx2::axpy(y, alpha, x) },
        _ => scalar::axpy(y, alpha, x),
    }
}

/// One instruction-set level's kernels. Implementors are tokens that can only be created
/// once the CPU is known to support the level, which is what makes these methods safe.
trait Kernels: Copy + Send + Sync {
    /// Most tokens one micro-kernel tile handles.
    const TOKENS: usize;
    /// Most weight rows one micro-kernel tile handles.
    const ROWS: usize;

    /// Computes `block` into `out` (see [`Block`]).
    fn gemm(self, block: &Block, out: &OutBlock);

    /// `dst[r * len + k] = src[r * stride + k]` widened to f32, for `r < n_rows`, `k < len`.
    fn widen(self, src: WeightData, stride: usize, n_rows: usize, len: usize, dst: &mut [f32]);
}

/// A block of a product: `out[t, r] (+)= sum_{k < len} x[t * x_stride + k] * w[r * w_stride + k]`
/// for `t < n_tokens`, `r < n_rows`. `x` and `w` start at the block's first column.
struct Block<'a> {
    x: &'a [f32],
    x_stride: usize,
    n_tokens: usize,
    w: WeightData<'a>,
    w_stride: usize,
    n_rows: usize,
    len: usize,
}

impl Block<'_> {
    /// Panics unless every element the block reads lies inside its slices; kernels rely on
    /// this to index without bounds checks.
    fn assert_in_bounds(&self) {
        let fits =
            |n: usize, stride: usize, have: usize| n == 0 || (n - 1) * stride + self.len <= have;
        assert!(fits(self.n_tokens, self.x_stride, self.x.len()));
        assert!(fits(self.n_rows, self.w_stride, self.w.elems()));
    }
}

/// The output of a whole product, shared by the tasks that each write their own rows.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: an `OutPtr` is only written through `OutBlock`s, whose creators guarantee that
// concurrent blocks write disjoint elements.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn new(out: &mut [f32]) -> Self {
        OutPtr {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }
}

/// Where a block's results go: element `(t, r)` of the block is `out[offset + t * stride + r]`.
struct OutBlock {
    out: OutPtr,
    offset: usize,
    stride: usize,
    /// Add to the existing value rather than overwrite it.
    accumulate: bool,
}

impl OutBlock {
    /// # Safety
    /// While the block is alive, no other thread may access the elements it writes, and the
    /// slice behind `out` must outlive it.
    unsafe fn new(out: OutPtr, offset: usize, stride: usize, accumulate: bool) -> Self {
        OutBlock {
            out,
            offset,
            stride,
            accumulate,
        }
    }

    #[inline]
    fn put(&self, t: usize, r: usize, value: f32) {
        let i = self.offset + t * self.stride + r;
        assert!(i < self.out.len);
        // SAFETY: in bounds (checked above) and, by `new`'s contract, only this block touches
        // element `i` while it lives.
        unsafe {
            let p = self.out.ptr.add(i);
            *p = if self.accumulate { *p + value } else { value };
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread only: waking the pool
/// would cost more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// Up to this many activation floats (`n_tokens * cols`, 256 KiB: they stay in L2), products
/// stream the weights directly rather than widening them into panels.
const DIRECT_MAX_X: usize = 1 << 16;

/// Columns widened at a time in the panel schedule (a multiple of 16). Small enough that a
/// panel block stays in L2 and a token tile's block in L1.
const K_BLOCK: usize = 1024;

/// Panel rows per task in the panel schedule, in micro-kernel row tiles.
const PANEL_TILES: usize = 16;

/// One product of a job: its weights and its output.
#[derive(Clone, Copy)]
struct Part<'a> {
    w: Matrix<'a>,
    out: OutPtr,
}

/// The threads a job of `work` multiply-adds is worth: waking the pool for less than
/// [`MIN_PARALLEL_WORK`] costs more than it saves.
fn threads_for(pool: &ThreadPool, work: usize) -> usize {
    if work < MIN_PARALLEL_WORK {
        1
    } else {
        pool.threads()
    }
}

/// Rows all parts of a job have together, and the total multiply-adds.
fn job_size(parts: &[Option<Part>], n_tokens: usize) -> (usize, usize) {
    let rows: usize = parts.iter().flatten().map(|p| p.w.rows).sum();
    let work = parts
        .iter()
        .flatten()
        .map(|p| p.w.rows.saturating_mul(p.w.cols))
        .sum::<usize>()
        .saturating_mul(n_tokens);
    (rows, work)
}

/// Products of the same f32 activations with one or more matrices of equal `cols`.
struct Product<'a> {
    x: &'a [f32],
    n_tokens: usize,
    parts: &'a [Option<Part<'a>>],
}

impl Product<'_> {
    /// Runs at `isa`, capped at what the CPU supports.
    fn dispatch(&self, isa: Isa, pool: &ThreadPool, scratch: &mut MatmulScratch) {
        let parts = || self.parts.iter().flatten();
        if parts().all(|p| p.out.len == 0) {
            return;
        }
        for part in parts().filter(|p| p.w.cols == 0) {
            // SAFETY: `out` came from a live `&mut [f32]` of `len` floats that nothing else
            // touches during the product.
            unsafe { std::slice::from_raw_parts_mut(part.out.ptr, part.out.len) }.fill(0.0);
        }
        if parts().any(|p| p.w.cols == 0) {
            return;
        }
        match isa.min(Isa::detect()) {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => match avx512::Avx512::new() {
                Some(k) => self.run(k, pool, scratch),
                None => self.run(scalar::Scalar, pool, scratch),
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => match avx2::Avx2::new() {
                Some(k) => self.run(k, pool, scratch),
                None => self.run(scalar::Scalar, pool, scratch),
            },
            _ => self.run(scalar::Scalar, pool, scratch),
        }
    }

    fn run<K: Kernels>(&self, k: K, pool: &ThreadPool, scratch: &mut MatmulScratch) {
        let Some(first) = self.parts.iter().flatten().next() else {
            return;
        };
        let cols = first.w.cols;
        let (rows, work) = job_size(self.parts, self.n_tokens);
        let threads = threads_for(pool, work);
        // Quantized weights are always dequantized into panels first.
        let quant = self
            .parts
            .iter()
            .flatten()
            .any(|p| matches!(p.w.data, WeightData::Quant(..)));
        // A few tokens through quantized weights: dequantized block by block in registers
        // and L1 where the CPU has AVX-512 (`dequant_avx512::few_tokens`).
        #[cfg(target_arch = "x86_64")]
        let few_quant = quant
            && self.n_tokens <= dequant_avx512::FEW_TOKENS
            && Isa::detect() == Isa::Avx512
            && avx512::Avx512::new().is_some();
        #[cfg(not(target_arch = "x86_64"))]
        let few_quant = false;
        let direct = few_quant
            || (!quant && (self.n_tokens <= K::TOKENS || self.n_tokens * cols <= DIRECT_MAX_X));
        let (split, panel_rows) = if direct {
            (TaskSplit::guided(self.parts, threads, K::ROWS), 0)
        } else {
            // At least two panels per thread when the matrix allows it, for balance.
            let per = rows.div_ceil(2 * threads).next_multiple_of(K::ROWS);
            let per = per.clamp(K::ROWS, PANEL_TILES * K::ROWS);
            (TaskSplit::even(self.parts, per), per)
        };
        let n_tasks = split.tasks();
        // f32 weights need no widening, hence no panel.
        let widen = self
            .parts
            .iter()
            .flatten()
            .any(|p| !matches!(p.w.data, WeightData::F32(_)));
        let panel_len = panel_rows * K_BLOCK.min(cols);
        if !direct && widen {
            // Grow the panels here, once, rather than in whichever task first needs one.
            let slots = threads.min(n_tasks);
            if scratch.panels.len() < slots {
                scratch.panels.resize_with(slots, Default::default);
            }
            for panel in &mut scratch.panels[..slots] {
                let panel = panel.get_mut().unwrap_or_else(PoisonError::into_inner);
                if panel.len() < panel_len {
                    panel.resize(panel_len, 0.0);
                }
            }
        }
        let panels = &scratch.panels[..];
        run_tasks(pool, threads, self.parts, &split, |part, r0, r1| {
            #[cfg(target_arch = "x86_64")]
            if few_quant {
                if let (Some(cpu), WeightData::Quant(qt, w)) = (avx512::Avx512::new(), part.w.data)
                {
                    let rows = r0..r1;
                    let x = self.x;
                    let (n, cols) = (self.n_tokens, part.w.cols);
                    return dequant_avx512::few_tokens(
                        cpu,
                        qt,
                        w,
                        cols,
                        x,
                        n,
                        rows,
                        part.out,
                        part.w.rows,
                    );
                }
            }
            if direct {
                self.direct(k, part, r0, r1);
            } else if widen {
                with_panel(panels, panel_len, |panel| {
                    self.panel(k, part, r0, r1, panel)
                });
            } else {
                self.panel(k, part, r0, r1, &mut []);
            }
        });
    }

    /// Rows `r0..r1` of `part` for all tokens, streaming the stored weights. With more tokens
    /// than one tile holds, one row tile at a time, so its weights stay in L1 across the token
    /// tiles (and are read from memory once).
    fn direct<K: Kernels>(&self, k: K, part: &Part, r0: usize, r1: usize) {
        let cols = part.w.cols;
        let step = if self.n_tokens > K::TOKENS {
            K::ROWS
        } else {
            r1 - r0
        };
        for g0 in (r0..r1).step_by(step) {
            let g1 = (g0 + step).min(r1);
            let block = Block {
                x: self.x,
                x_stride: cols,
                n_tokens: self.n_tokens,
                w: part.w.data.tail_from(g0 * cols),
                w_stride: cols,
                n_rows: g1 - g0,
                len: cols,
            };
            // SAFETY: tasks own disjoint row ranges, so this block's elements (rows g0..g1 of
            // every token) are written by nobody else; `out` outlives the product.
            let out = unsafe { OutBlock::new(part.out, g0, part.w.rows, false) };
            k.gemm(&block, &out);
        }
    }

    /// Rows `r0..r1` of `part` for all tokens, one block of columns at a time; bf16 and f16
    /// blocks are first widened into `panel` (`f32` weights are used in place and `panel` may
    /// be empty).
    fn panel<K: Kernels>(&self, k: K, part: &Part, r0: usize, r1: usize, panel: &mut [f32]) {
        let cols = part.w.cols;
        let n_rows = r1 - r0;
        let mut k0 = 0;
        while k0 < cols {
            let len = K_BLOCK.min(cols - k0);
            let src = part.w.data.tail_from(r0 * cols + k0);
            let (w, w_stride) = match src {
                WeightData::F32(_) => (src, cols),
                WeightData::Quant(..) => {
                    let panel = &mut panel[..n_rows * len];
                    dequant::widen_quant(src, cols, n_rows, len, panel);
                    (WeightData::F32(panel), len)
                }
                WeightData::Bf16(_) | WeightData::F16(_) => {
                    let panel = &mut panel[..n_rows * len];
                    k.widen(src, cols, n_rows, len, panel);
                    (WeightData::F32(panel), len)
                }
            };
            let block = Block {
                x: &self.x[k0..],
                x_stride: cols,
                n_tokens: self.n_tokens,
                w,
                w_stride,
                n_rows,
                len,
            };
            // SAFETY: as in `direct`: this task alone writes rows r0..r1.
            let out = unsafe { OutBlock::new(part.out, r0, part.w.rows, k0 > 0) };
            k.gemm(&block, &out);
            k0 += len;
        }
    }
}

/// Runs `f` with a panel of `len` floats from a free scratch slot (grown if it is shorter,
/// which `Product::run`'s growing beforehand makes the exception).
fn with_panel(panels: &[Mutex<Vec<f32>>], len: usize, f: impl FnOnce(&mut [f32])) {
    with_slot(panels, |panel| {
        if panel.len() < len {
            panel.resize(len, 0.0);
        }
        f(&mut panel[..len])
    });
}

/// Runs `f` with the first free scratch slot of `slots` (which a task may grow; it keeps
/// its size for the next product).
fn with_slot<T: Default>(slots: &[Mutex<T>], f: impl FnOnce(&mut T)) {
    // At most `slots.len()` tasks run at once, so a free slot exists; a missing one would be
    // a bug, and a temporary value keeps it a slowdown only.
    for slot in slots {
        if let Ok(mut value) = slot.try_lock() {
            return f(&mut value);
        }
    }
    f(&mut T::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) of values in [-1, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Dtype {
        F32,
        Bf16,
        F16,
    }

    /// Weights stored in a dtype, plus the same values as f32 for the reference.
    struct Weights {
        f32s: Vec<f32>,
        bits: Vec<u16>,
        exact: Vec<f32>,
        dtype: Dtype,
    }

    impl Weights {
        fn random(rng: &mut Rng, n: usize, dtype: Dtype) -> Self {
            let f32s = rng.vec(n);
            let bits: Vec<u16> = match dtype {
                Dtype::F32 => Vec::new(),
                Dtype::Bf16 => f32s.iter().map(|v| (v.to_bits() >> 16) as u16).collect(),
                Dtype::F16 => f32s
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect(),
            };
            let exact = match dtype {
                Dtype::F32 => f32s.clone(),
                Dtype::Bf16 => bits.iter().map(|&b| bf16_to_f32(b)).collect(),
                Dtype::F16 => bits
                    .iter()
                    .map(|&b| half::f16::from_bits(b).to_f32())
                    .collect(),
            };
            Weights {
                f32s,
                bits,
                exact,
                dtype,
            }
        }

        fn matrix(&self, rows: usize, cols: usize) -> Matrix<'_> {
            let data = match self.dtype {
                Dtype::F32 => WeightData::F32(&self.f32s),
                Dtype::Bf16 => WeightData::Bf16(&self.bits),
                Dtype::F16 => WeightData::F16(&self.bits),
            };
            Matrix { data, rows, cols }
        }
    }

    /// Checks `matmul_with` against an f64 reference, relative to each output's |x|.|w|.
    fn check(isa: Isa, pool: &ThreadPool, rows: usize, cols: usize, n: usize, dtype: Dtype) {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (rows * 7919 + cols * 31 + n) as u64);
        let w = Weights::random(&mut rng, rows * cols, dtype);
        let x = rng.vec(n * cols);
        let mut out = vec![f32::NAN; n * rows];
        let mut scratch = MatmulScratch::default();
        let m = w.matrix(rows, cols);
        // Twice, to exercise a warm scratch.
        for _ in 0..2 {
            matmul_with(isa, pool, &x, n, &m, &mut out, &mut scratch);
        }
        for t in 0..n {
            for r in 0..rows {
                let (mut sum, mut bound) = (0.0f64, 0.0f64);
                for k in 0..cols {
                    let p = x[t * cols + k] as f64 * w.exact[r * cols + k] as f64;
                    sum += p;
                    bound += p.abs();
                }
                let got = out[t * rows + r] as f64;
                assert!(
                    (got - sum).abs() <= 1e-5 * bound + 1e-30,
                    "{isa:?} {dtype:?} {rows}x{cols} n={n} t={t} r={r}: {got} vs {sum}"
                );
            }
        }
    }

    const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    #[test]
    fn small_and_odd_shapes_match_reference() {
        let shapes = [
            (1, 1),
            (3, 5),
            (5, 16),
            (7, 33),
            (8, 64),
            (13, 17),
            (64, 172),
            (37, 100),
        ];
        let pools = [ThreadPool::new(1), ThreadPool::new(2)];
        for isa in Isa::available() {
            for pool in &pools {
                for dtype in DTYPES {
                    for &(rows, cols) in &shapes {
                        for n in (1..=9).chain([13, 17]) {
                            check(isa, pool, rows, cols, n, dtype);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn larger_shapes_match_reference() {
        // Past the parallel threshold, several panels and column blocks, ragged tails.
        let shapes = [(130, 515), (512, 64), (203, 1100), (64, 1030)];
        let pool = ThreadPool::new(2);
        for isa in Isa::available() {
            for dtype in DTYPES {
                for &(rows, cols) in &shapes {
                    for n in [1, 2, 3, 4, 5, 11, 33] {
                        check(isa, &pool, rows, cols, n, dtype);
                    }
                }
            }
        }
    }

    #[test]
    fn panel_schedule_matches_reference() {
        // n_tokens * cols above DIRECT_MAX_X: widened panels, several column blocks (the last
        // one ragged), several panels per thread.
        let cases = [(70, 1100, 65), (9, 2100, 40), (133, 700, 100)];
        for &(_, cols, n) in &cases {
            assert!(n * cols > DIRECT_MAX_X);
        }
        let pools = [ThreadPool::new(1), ThreadPool::new(2)];
        for isa in Isa::available() {
            for pool in &pools {
                for dtype in DTYPES {
                    for &(rows, cols, n) in &cases {
                        check(isa, pool, rows, cols, n, dtype);
                    }
                }
            }
        }
    }

    /// bf16 rounding to nearest even, as the fast path rounds activations.
    fn round_bf16(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    #[test]
    fn groups_match_separate_products() {
        // q/k/v-like parts of different heights sharing one input, both numerics; each part
        // must equal its own product (exact: bit for bit).
        let pool = ThreadPool::new(2);
        let mut rng = Rng(21);
        let cols = 300;
        let heights = [96, 32, 37];
        let ws: Vec<Weights> = heights
            .iter()
            .map(|&r| Weights::random(&mut rng, r * cols, Dtype::Bf16))
            .collect();
        for n in [1, 3, 4, 7, 40] {
            let x = rng.vec(n * cols);
            for numerics in [Precision::F32, Precision::Bf16, Precision::Bf16Split] {
                let mut outs: Vec<Vec<f32>> = heights.iter().map(|&r| vec![0.0; n * r]).collect();
                let mut scratch = MatmulScratch::default();
                let parts = ws
                    .iter()
                    .zip(outs.iter_mut())
                    .zip(heights)
                    .map(|((w, out), r)| GroupPart {
                        w: w.matrix(r, cols),
                        out,
                    });
                matmul_group(&pool, numerics, &x, n, parts, &mut scratch);
                for ((w, out), r) in ws.iter().zip(&outs).zip(heights) {
                    let mut alone = vec![0.0; n * r];
                    matmul_group(
                        &pool,
                        numerics,
                        &x,
                        n,
                        [GroupPart {
                            w: w.matrix(r, cols),
                            out: &mut alone,
                        }],
                        &mut scratch,
                    );
                    assert_eq!(out, &alone, "{numerics:?} n={n} rows={r}");
                }
            }
        }
    }

    #[test]
    fn fast_path_matches_bf16_reference() {
        // Where the CPU has AVX512-BF16, `Fast` must equal the product of bf16-rounded
        // activations with the weights, summed in f32 (within f32 summation error); elsewhere
        // it must be exactly `Exact`.
        let pool = ThreadPool::new(2);
        let shapes = [
            (5, 16),
            (13, 33),
            (64, 172),
            (130, 515),
            (203, 1100),
            (40, 2100),
        ];
        for &(rows, cols) in &shapes {
            for n in [1, 2, 3, 4, 5, 9, 33, 70] {
                let mut rng = Rng(0x51 ^ (rows * 31 + cols * 7 + n) as u64);
                let w = Weights::random(&mut rng, rows * cols, Dtype::Bf16);
                let x = rng.vec(n * cols);
                let m = w.matrix(rows, cols);
                let mut scratch = MatmulScratch::default();
                let mut fast = vec![f32::NAN; n * rows];
                let part = GroupPart {
                    w: m,
                    out: &mut fast,
                };
                matmul_group(&pool, Precision::Bf16, &x, n, [part], &mut scratch);
                if !bf16_dot_supported() {
                    let mut exact = vec![0.0; n * rows];
                    matmul(&pool, &x, n, &m, &mut exact, &mut scratch);
                    assert_eq!(fast, exact);
                    continue;
                }
                for t in 0..n {
                    for r in 0..rows {
                        let (mut sum, mut bound) = (0.0f64, 0.0f64);
                        for k in 0..cols {
                            let p =
                                round_bf16(x[t * cols + k]) as f64 * w.exact[r * cols + k] as f64;
                            sum += p;
                            bound += p.abs();
                        }
                        let got = fast[t * rows + r] as f64;
                        assert!(
                            (got - sum).abs() <= 1e-5 * bound + 1e-30,
                            "{rows}x{cols} n={n} t={t} r={r}: {got} vs {sum}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn one_token_half_input_matches_f16_reference() {
        // Where AVX-512 is present, one token through f16 weights (any fast precision) or bf16
        // weights (`Bf16Split`) must equal the product of the f16-rounded, range-clamped input
        // with the weights, summed in f32; elsewhere, and for several tokens, it is not taken.
        let pool = ThreadPool::new(2);
        let cases = [
            (Dtype::F16, Precision::Bf16),
            (Dtype::F16, Precision::Bf16Split),
            (Dtype::Bf16, Precision::Bf16Split),
        ];
        for &(rows, cols) in &[(5, 16), (13, 33), (64, 172), (203, 1100), (40, 5632)] {
            for &(dtype, precision) in &cases {
                let mut rng = Rng(0x77 ^ (rows * 31 + cols * 7) as u64);
                let w = Weights::random(&mut rng, rows * cols, dtype);
                let mut x = rng.vec(cols);
                // Beyond f16's range: clamped to 65504, not infinity.
                x[cols / 2] = 1.0e6;
                let m = w.matrix(rows, cols);
                assert_eq!(
                    precision.uses_half_input(&m.data),
                    Isa::detect() == Isa::Avx512
                );
                assert!(!Precision::F32.uses_half_input(&m.data));
                let mut got = vec![f32::NAN; rows];
                let part = GroupPart {
                    w: m,
                    out: &mut got,
                };
                matmul_group(
                    &pool,
                    precision,
                    &x,
                    1,
                    [part],
                    &mut MatmulScratch::default(),
                );
                if Isa::detect() != Isa::Avx512 {
                    continue;
                }
                for (r, &got) in got.iter().enumerate() {
                    let (mut sum, mut bound) = (0.0f64, 0.0f64);
                    for (k, &xk) in x.iter().enumerate() {
                        let xh = half::f16::from_f32(xk.clamp(-65504.0, 65504.0)).to_f32();
                        let p = xh as f64 * w.exact[r * cols + k] as f64;
                        sum += p;
                        bound += p.abs();
                    }
                    assert!(
                        (got as f64 - sum).abs() <= 1e-5 * bound + 1e-30,
                        "{dtype:?} {precision:?} {rows}x{cols} r={r}: {got} vs {sum}"
                    );
                }
            }
        }
    }

    /// `n` random blocks of `qt` whose f16 scales (and mins) are finite, of either sign.
    fn random_blocks(rng: &mut Rng, qt: QuantType, n: usize) -> Vec<u8> {
        crate::model::quant::random_blocks(qt, n, 0.05, || rng.next())
    }

    #[test]
    fn simd_dequantization_equals_the_reference() {
        let mut rng = Rng(0x0dd);
        for qt in QuantType::ALL {
            let blocks = random_blocks(&mut rng, qt, 9);
            let mut want = vec![0.0; 9 * qt.block_elems()];
            crate::model::quant::dequantize_scalar(qt, &blocks, &mut want);
            let mut got = vec![f32::NAN; want.len()];
            dequant::dequantize(qt, &blocks, &mut got);
            // Equal values (a zero may differ in sign: the SIMD Q4_0/Q5_0 path fuses q·d - c·d).
            let same = want.iter().zip(&got).all(|(a, b)| a == b);
            assert!(same, "{}: {:?} vs {:?}", qt.name(), &got[..8], &want[..8]);
        }
    }

    /// `out` (`[n, rows]`) is `x` (`[n, cols]`) times `w` (`[rows, cols]`) transposed, within
    /// 1e-5 of each output's `sum |x·w|` of an f64 reference.
    fn assert_product(x: &[f32], w: &[f32], n: usize, rows: usize, out: &[f32], what: &str) {
        let cols = x.len() / n;
        for t in 0..n {
            for r in 0..rows {
                let (mut sum, mut bound) = (0.0f64, 0.0f64);
                for k in 0..cols {
                    let p = x[t * cols + k] as f64 * w[r * cols + k] as f64;
                    sum += p;
                    bound += p.abs();
                }
                let got = out[t * rows + r] as f64;
                assert!(
                    (got - sum).abs() <= 1e-5 * bound + 1e-30,
                    "{what} {rows}x{cols} n={n} t={t} r={r}: {got} vs {sum}"
                );
            }
        }
    }

    #[test]
    fn quantized_products_match_dequantized_reference() {
        // Every type, one token (decode) and several (prefill), against the scalar
        // dequantization followed by an f64 dot product.
        let pool = ThreadPool::new(2);
        for qt in QuantType::ALL {
            for &(rows, cols) in &[(5, 256), (37, 512), (20, 1280)] {
                for n in [1, 2, 5, 33] {
                    let mut rng = Rng(0x9e ^ (rows * 31 + cols * 7 + n) as u64);
                    let blocks = random_blocks(&mut rng, qt, rows * cols / qt.block_elems());
                    let mut exact = vec![0.0; rows * cols];
                    crate::model::quant::dequantize_scalar(qt, &blocks, &mut exact);
                    let x = rng.vec(n * cols);
                    let m = Matrix {
                        data: WeightData::Quant(qt, &blocks),
                        rows,
                        cols,
                    };
                    let mut out = vec![f32::NAN; n * rows];
                    matmul(&pool, &x, n, &m, &mut out, &mut MatmulScratch::default());
                    assert_product(&x, &exact, n, rows, &out, qt.name());
                    let mut row = vec![0.0; cols];
                    m.row_to_f32(rows - 1, &mut row);
                    assert_eq!(row, exact[(rows - 1) * cols..]);
                    assert_eq!(m.get(1, cols - 3), exact[cols + cols - 3]);
                }
            }
        }
    }

    /// A 256-element block's scale `max|x| / range` and its inverse (0 and 0 for a zero
    /// block), as the integer paths compute them.
    fn reference_scale(block: &[f32], range: f32) -> (f32, f32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax > 0.0 {
            (amax / range, range / amax)
        } else {
            (0.0, 0.0)
        }
    }

    /// The documented rounding of activations to two bytes, written independently of the
    /// kernels: per 256 elements of each row of `cols` (the last run of a row may be
    /// shorter), `dx = max|x| / 127`, `hi = round(x / dx)`, `lo = round(256·(x / dx − hi))`
    /// (ties to even, saturated to an i8), value `dx·(hi + lo / 256)`.
    fn rounded_to_two_bytes(x: &[f32], cols: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for block in x.chunks(cols).flat_map(|row| row.chunks(256)) {
            let (d, inv) = reference_scale(block, 127.0);
            out.extend(block.iter().map(|&v| {
                let scaled = v * inv;
                let hi = scaled.round_ties_even();
                let lo = ((scaled - hi) * 256.0)
                    .round_ties_even()
                    .clamp(-128.0, 127.0);
                d * (hi + lo / 256.0)
            }));
        }
        out
    }

    /// `x` as the i16 prefill path rounds it: per 256 elements of a row (the last run may be
    /// shorter), `dx = max|x| / 32767` and `dx·round(x / dx)`.
    fn rounded_to_i16(x: &[f32], cols: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for block in x.chunks(cols).flat_map(|row| row.chunks(256)) {
            let (d, inv) = reference_scale(block, 32767.0);
            out.extend(block.iter().map(|&v| d * (v * inv).round_ties_even()));
        }
        out
    }

    #[test]
    fn integer_products_match_reference_on_rounded_activations() {
        // Fast numerics, quantized weights with integer kernels: the product of the
        // dequantized weights with the activations as rounded to two bytes (up to 16 tokens)
        // or to i16 (more), in f64. A wrong
        // element order, scale or min moves the result by far more than the 1e-5. The shapes
        // cover padded row groups, several tasks, token tiles of every size and a second
        // block of columns; for the 32-element types also rows that end in a short run of
        // 256 (one, two and seven blocks; two, after a first block of 1024 columns).
        if !Precision::Bf16.uses_integer_dot(&WeightData::Quant(QuantType::Q4K, &[])) {
            eprintln!("SKIP integer products: this CPU has no AVX512-VNNI; fast == exact here");
            return;
        }
        let pool = ThreadPool::new(2);
        let mut scratch = MatmulScratch::default();
        let types = QuantType::ALL.into_iter().filter(|&qt| q8dot::supports(qt));
        for qt in types {
            let small = qt.block_elems() == 32;
            let short_runs: &[(usize, usize)] = if small {
                &[(9, 288), (37, 576), (4, 224), (6, 1088)]
            } else {
                &[]
            };
            let shapes = [(5, 256), (37, 512), (20, 1280), (70, 2304)];
            for &(rows, cols) in shapes.iter().chain(short_runs) {
                for n in [1, 2, 3, 4, 5, 8, 13, q8dot::TOKENS, 17, 24, 41] {
                    if rows == 70 && n < 17 {
                        continue;
                    }
                    let mut rng = Rng(0x51 ^ (rows * 31 + cols * 7 + n) as u64);
                    // Two matrices in one group, with 3 and `rows` rows.
                    let (rows_a, rows_b) = (3, rows);
                    let per_block = qt.block_elems();
                    let blocks_a = random_blocks(&mut rng, qt, rows_a * cols / per_block);
                    let blocks_b = random_blocks(&mut rng, qt, rows_b * cols / per_block);
                    // Activations of mixed sizes, so the blocks' scales differ.
                    let x: Vec<f32> = (0..n * cols)
                        .map(|i| rng.next() * if i % 97 == 0 { 8.0 } else { 1.0 })
                        .collect();
                    let xr = if n <= q8dot::TOKENS {
                        rounded_to_two_bytes(&x, cols)
                    } else {
                        rounded_to_i16(&x, cols)
                    };
                    let mut out_a = vec![f32::NAN; n * rows_a];
                    let mut out_b = vec![f32::NAN; n * rows_b];
                    let parts = [
                        GroupPart {
                            w: Matrix {
                                data: WeightData::Quant(qt, &blocks_a),
                                rows: rows_a,
                                cols,
                            },
                            out: &mut out_a,
                        },
                        GroupPart {
                            w: Matrix {
                                data: WeightData::Quant(qt, &blocks_b),
                                rows: rows_b,
                                cols,
                            },
                            out: &mut out_b,
                        },
                    ];
                    matmul_group(&pool, Precision::Bf16, &x, n, parts, &mut scratch);
                    let rounded = if n <= q8dot::TOKENS {
                        scratch.x_q8.values()
                    } else {
                        scratch.x_i16.values()
                    };
                    assert_eq!(rounded[..n * cols], xr, "rounded activations");
                    for (blocks, out, rows) in
                        [(&blocks_a, &out_a, rows_a), (&blocks_b, &out_b, rows_b)]
                    {
                        let mut w = vec![0.0; rows * cols];
                        crate::model::quant::dequantize_scalar(qt, blocks, &mut w);
                        assert_product(&xr, &w, n, rows, out, qt.name());
                    }
                }
            }
        }
    }

    #[test]
    fn integer_products_hold_extreme_weights_and_activations() {
        // Every quant and scale byte at one extreme (all bits clear or set, or the signed
        // extremes), the block factors at 1, and activations all at +-max: products as large
        // as each type allows, which must not overflow the kernels' i32 sums (decode: two-byte
        // activations; prefill: i16 with the flush interval each type's bound allows).
        if !Precision::Bf16.uses_integer_dot(&WeightData::Quant(QuantType::Q4K, &[])) {
            eprintln!("SKIP integer products: this CPU has no AVX512-VNNI; fast == exact here");
            return;
        }
        let pool = ThreadPool::new(2);
        let mut scratch = MatmulScratch::default();
        let (rows, cols) = (32, 512);
        let types = QuantType::ALL.into_iter().filter(|&qt| q8dot::supports(qt));
        for qt in types {
            let bytes = qt.bytes_for(qt.block_elems());
            for fill in [0x00u8, 0xff, 0x80, 0x7f, 0x88] {
                let mut blocks = vec![fill; qt.bytes_for(rows * cols)];
                for block in blocks.chunks_exact_mut(bytes) {
                    for &at in qt.f16_fields() {
                        block[at..at + 2].copy_from_slice(&half::f16::ONE.to_bits().to_le_bytes());
                    }
                }
                let mut w = vec![0.0; rows * cols];
                crate::model::quant::dequantize_scalar(qt, &blocks, &mut w);
                for n in [3, 40] {
                    for sign in [1.0f32, -1.0] {
                        let x = vec![sign * 3.0; n * cols];
                        let mut out = vec![f32::NAN; n * rows];
                        let part = GroupPart {
                            w: Matrix {
                                data: WeightData::Quant(qt, &blocks),
                                rows,
                                cols,
                            },
                            out: &mut out,
                        };
                        matmul_group(&pool, Precision::Bf16, &x, n, [part], &mut scratch);
                        let what = format!("{} filled with {fill:#x}", qt.name());
                        assert_product(&x, &w, n, rows, &out, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn empty_products() {
        let pool = ThreadPool::new(2);
        let mut scratch = MatmulScratch::default();
        let w = Matrix {
            data: WeightData::F32(&[]),
            rows: 3,
            cols: 0,
        };
        let mut out = vec![1.0; 6];
        matmul(&pool, &[], 2, &w, &mut out, &mut scratch);
        assert_eq!(out, vec![0.0; 6]);
        let w = Matrix {
            data: WeightData::Bf16(&[0; 12]),
            rows: 3,
            cols: 4,
        };
        matmul(&pool, &[], 0, &w, &mut [], &mut scratch);
    }

    #[test]
    fn scratch_does_not_grow_in_steady_state() {
        let pool = ThreadPool::new(2);
        let mut rng = Rng(7);
        let w = Weights::random(&mut rng, 256 * 700, Dtype::Bf16);
        let x = rng.vec(20 * 700);
        let mut out = vec![0.0; 20 * 256];
        let mut scratch = MatmulScratch::default();
        let m = w.matrix(256, 700);
        matmul(&pool, &x, 20, &m, &mut out, &mut scratch);
        let ptrs = |s: &MatmulScratch| -> Vec<(usize, usize)> {
            s.panels
                .iter()
                .map(|p| {
                    let p = p.lock().unwrap_or_else(PoisonError::into_inner);
                    (p.as_ptr() as usize, p.capacity())
                })
                .collect()
        };
        let before = ptrs(&scratch);
        for _ in 0..5 {
            matmul(&pool, &x, 20, &m, &mut out, &mut scratch);
        }
        assert_eq!(before, ptrs(&scratch));
    }

    #[test]
    fn row_to_f32_matches_get() {
        let mut rng = Rng(11);
        for dtype in DTYPES {
            for cols in [1, 7, 16, 37, 100] {
                let w = Weights::random(&mut rng, 3 * cols, dtype);
                let m = w.matrix(3, cols);
                let mut row = vec![0.0; cols];
                for r in 0..3 {
                    m.row_to_f32(r, &mut row);
                    for (c, &v) in row.iter().enumerate() {
                        assert_eq!(v.to_bits(), m.get(r, c).to_bits());
                    }
                }
            }
        }
    }

    type DotFn = fn(&[f32], &[f32]) -> f32;
    type AxpyFn = fn(&mut [f32], f32, &[f32]);

    /// `dot` and `axpy` at every level the CPU supports.
    fn vector_kernels() -> Vec<(Isa, DotFn, AxpyFn)> {
        let mut all: Vec<(Isa, DotFn, AxpyFn)> = vec![(Isa::Scalar, scalar::dot, scalar::axpy)];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::Avx2::new().is_some() {
                // SAFETY: the CPU supports AVX2/FMA/F16C (checked just above).
                all.push((
                    Isa::Avx2,
                    |a, b| unsafe { avx2::dot(a, b) },
                    |y, a, x| unsafe { avx2::axpy(y, a, x) },
                ));
            }
            if avx512::Avx512::new().is_some() {
                // SAFETY: the CPU supports AVX-512 F/BW/VL (checked just above).
                all.push((
                    Isa::Avx512,
                    |a, b| unsafe { avx512::dot(a, b) },
                    |y, a, x| unsafe { avx512::axpy(y, a, x) },
                ));
            }
        }
        all
    }

    #[test]
    fn dot_and_axpy_match_reference() {
        let mut rng = Rng(3);
        for (isa, dot, axpy) in vector_kernels() {
            for n in 0..=140 {
                let a = rng.vec(n);
                let b = rng.vec(n);
                let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
                let bound: f64 = a
                    .iter()
                    .zip(&b)
                    .map(|(&x, &y)| (x as f64 * y as f64).abs())
                    .sum();
                let got = dot(&a, &b) as f64;
                assert!(
                    (got - exact).abs() <= 1e-6 * bound + 1e-30,
                    "{isa:?} dot n={n}"
                );

                let mut y = b.clone();
                axpy(&mut y, 0.75, &a);
                for i in 0..n {
                    let want = b[i] as f64 + 0.75 * a[i] as f64;
                    assert!(
                        (y[i] as f64 - want).abs() <= 1e-6,
                        "{isa:?} axpy n={n} i={i}"
                    );
                }
            }
        }
        // The dispatched versions agree with the best level.
        let (a, b) = (rng.vec(77), rng.vec(77));
        let best = vector_kernels().last().map(|k| k.1(&a, &b));
        assert_eq!(best, Some(dot(&a, &b)));
    }
}
