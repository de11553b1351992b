//! The compiled kernels as loaded functions, and the one launch helper every call goes through.

use super::compile::Cubins;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

/// Every kernel the forward pass launches. Per-dtype variants are indexed by
/// [`super::weights::DevDType`].
pub struct Kernels {
    pub embed: [CudaFunction; 3],
    pub gemv: [CudaFunction; 3],
    /// GEMVs that apply the RMSNorm to their input as they read it.
    pub gemv_norm: [CudaFunction; 3],
    /// GEMVs of the interleaved gate/up matrix that apply the RMSNorm to their input and write
    /// the SwiGLU of each gate/up pair.
    pub gemv_norm_swiglu: [CudaFunction; 3],
    pub gemm: [CudaFunction; 3],
    /// Tensor-core products for bf16 weights (sm_80 and later).
    pub mma_bf16: CudaFunction,
    pub rms_norm: CudaFunction,
    pub gather_rms_norm: CudaFunction,
    pub add_bias: CudaFunction,
    pub silu_mul: CudaFunction,
    pub rope_kv_append: CudaFunction,
    /// Per bound on the head dim: 32, 64, 128, 256 ([`attention`] picks).
    pub attention_split: [CudaFunction; 4],
    pub argmax_rows: CudaFunction,
    /// Streaming multiprocessors of the device (how wide a launch must be to fill it).
    pub sms: usize,
    /// Whether products of several tokens with bf16 weights run on the tensor cores
    /// (`mma_bf16`): set by [`super::tensor_cores::enable`] once they have been checked.
    pub tensor_cores: bool,
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, cubins: &Cubins, sms: usize) -> Result<Kernels, String> {
        let mut modules = std::collections::HashMap::new();
        for (file, cubin) in cubins.iter() {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.clone()))
                .map_err(|e| format!("loading {file}: {e:?}"))?;
            modules.insert(*file, module);
        }
        let f = |file: &str, name: &str| -> Result<CudaFunction, String> {
            modules
                .get(file)
                .ok_or_else(|| format!("{file} was not compiled"))?
                .load_function(name)
                .map_err(|e| format!("{file}: no kernel {name}: {e:?}"))
        };
        let typed = |file: &str, prefix: &str| -> Result<[CudaFunction; 3], String> {
            Ok([
                f(file, &format!("{prefix}_f32"))?,
                f(file, &format!("{prefix}_f16"))?,
                f(file, &format!("{prefix}_bf16"))?,
            ])
        };
        Ok(Kernels {
            embed: typed("embed.cu", "embed")?,
            gemv: typed("matmul.cu", "gemv")?,
            gemv_norm: typed("matmul.cu", "gemv_norm")?,
            gemv_norm_swiglu: typed("matmul.cu", "gemv_norm_swiglu")?,
            gemm: typed("matmul.cu", "gemm")?,
            mma_bf16: f("matmul.cu", "mma_bf16")?,
            rms_norm: f("norm.cu", "rms_norm")?,
            gather_rms_norm: f("norm.cu", "gather_rms_norm")?,
            add_bias: f("elementwise.cu", "add_bias")?,
            silu_mul: f("elementwise.cu", "silu_mul")?,
            rope_kv_append: f("elementwise.cu", "rope_kv_append")?,
            attention_split: [
                f("attention.cu", "attention_split_d32")?,
                f("attention.cu", "attention_split_d64")?,
                f("attention.cu", "attention_split_d128")?,
                f("attention.cu", "attention_split_d256")?,
            ],
            argmax_rows: f("sampling.cu", "argmax_rows")?,
            sms,
            tensor_cores: false,
        })
    }
}

/// One kernel argument: a device pointer, a count, or a scalar.
#[derive(Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

/// Launches `func` on `stream` with `grid` blocks of `block` threads.
pub fn launch(
    stream: &CudaStream,
    func: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    args: &[Arg],
) -> Result<(), DriverError> {
    let mut builder = stream.launch_builder(func);
    for arg in args {
        match arg {
            Arg::Ptr(p) | Arg::U64(p) => builder.arg(p),
            Arg::I32(v) => builder.arg(v),
            Arg::F32(v) => builder.arg(v),
        };
    }
    let config = LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: each kernel's arguments are built by the backend to match its signature in
    // kernels/*.cu, with pointers into live device buffers sized for the launch.
    unsafe { builder.launch(config) }.map(|_| ())
}

/// Blocks of 256 threads for a grid-stride loop over `n` elements.
pub fn elementwise_blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 8192) as u32
}

/// Products of up to this many tokens run as GEMVs (`GEMV_TOKENS_PER_PASS` tokens per pass
/// over the weights); more run as tiled GEMMs.
pub const GEMV_MAX_TOKENS: usize = 64;
const GEMV_TOKENS_PER_PASS: usize = 8;
/// Rows one warp of the GEMV computes (`GEMV_ROWS` in matmul.cu).
const GEMV_ROWS: usize = 2;
/// A GEMV aims for this many warps per multiprocessor (enough loads in flight to keep memory
/// busy); short matrices share each row among up to 8 warps to get there.
const GEMV_WARPS_PER_SM: usize = 48;

/// A matrix on the device as the product kernels take it.
pub struct MatrixView {
    pub ptr: u64,
    /// Index of the kernel variant: [`super::weights::DevDType`].
    pub dtype: usize,
    pub rows: usize,
    pub cols: usize,
    pub bias: Option<u64>,
}

/// Warps sharing a warp's rows: the fewest (1, 2, 4, 8) that give the launch enough warps,
/// while each still gets at least two 256-element chunks of the rows.
fn warps_per_row(rows: usize, cols: usize, sms: usize) -> usize {
    let target = sms * GEMV_WARPS_PER_SM;
    let mut wpr = 1;
    while wpr < 8 && rows.div_ceil(GEMV_ROWS) * wpr < target && cols >= wpr * 2 * 2 * 256 {
        wpr *= 2;
    }
    wpr
}

/// Threads of a norm block (one block a row): enough that each loads only a few values.
const NORM_THREADS: u32 = 512;

/// `out[t] = rmsnorm(x[t]) * weight` for `tokens` rows of `cols` floats.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    stream: &CudaStream,
    k: &Kernels,
    x: u64,
    weight: u64,
    out: u64,
    tokens: usize,
    cols: usize,
    eps: f32,
) -> Result<(), DriverError> {
    let args = [
        Arg::Ptr(x),
        Arg::Ptr(weight),
        Arg::Ptr(out),
        Arg::I32(cols as i32),
        Arg::F32(eps),
    ];
    launch(
        stream,
        &k.rms_norm,
        (tokens as u32, 1, 1),
        NORM_THREADS,
        &args,
    )
}

/// The final norm of the rows that get logits: `out[i] = rmsnorm(x[rows[i]]) * weight` for
/// the `count` row indices at `rows`.
#[allow(clippy::too_many_arguments)]
pub fn gather_rms_norm(
    stream: &CudaStream,
    k: &Kernels,
    x: u64,
    rows: u64,
    weight: u64,
    out: u64,
    count: usize,
    cols: usize,
    eps: f32,
) -> Result<(), DriverError> {
    let args = [
        Arg::Ptr(x),
        Arg::Ptr(rows),
        Arg::Ptr(weight),
        Arg::Ptr(out),
        Arg::I32(cols as i32),
        Arg::F32(eps),
    ];
    let grid = (count as u32, 1, 1);
    launch(stream, &k.gather_rms_norm, grid, NORM_THREADS, &args)
}

/// `out[t] = silu(gate) * up` for `tokens` rows of the interleaved gate/up product
/// ([`super::weights::interleave_gate_up`], `2 × inter` rounded up to 16 floats a row).
pub fn silu_mul(
    stream: &CudaStream,
    k: &Kernels,
    gate_up: u64,
    out: u64,
    tokens: usize,
    inter: usize,
) -> Result<(), DriverError> {
    let n = tokens * inter;
    let args = [
        Arg::Ptr(gate_up),
        Arg::Ptr(out),
        Arg::I32(inter as i32),
        Arg::U64(n as u64),
    ];
    launch(
        stream,
        &k.silu_mul,
        (elementwise_blocks(n), 1, 1),
        256,
        &args,
    )
}

/// Products of at least this many tokens with bf16 weights run on the tensor cores (when
/// enabled): one token is bound by reading the weights, and the GEMV does that best.
pub const MMA_MIN_TOKENS: usize = 2;
/// Rows of W one warp of `mma_bf16` computes, and tokens one block does (`MMA_ROWS`,
/// `16 * MMA_TILES_M` in matmul.cu).
const MMA_ROWS: usize = 16;
const MMA_TOKENS: usize = 64;

/// Warps sharing a row group of `mma_bf16`: as [`warps_per_row`], counting the launch's token
/// tiles, with each warp keeping at least two 32-column chunks.
fn mma_warps_per_row(rows: usize, cols: usize, sms: usize, tiles: usize) -> usize {
    let target = sms * GEMV_WARPS_PER_SM;
    let mut wpr = 1;
    while wpr < 8 && rows.div_ceil(MMA_ROWS) * tiles * wpr < target && cols >= wpr * 2 * 2 * 32 {
        wpr *= 2;
    }
    wpr
}

/// What a product reads as its `tokens × cols` input.
#[derive(Clone, Copy)]
pub enum Input {
    /// The rows at this address.
    Rows(u64),
    /// The RMSNorm (weight `weight`, epsilon `eps`) of the rows at `x`. GEMVs apply it as
    /// they read x; GEMMs take it from `scratch` (`tokens × cols` floats), written first.
    Normed {
        x: u64,
        weight: u64,
        eps: f32,
        scratch: u64,
    },
}

/// The rows a product that cannot fold the norm reads: `input`'s rows, or their RMSNorm
/// written to its scratch first.
fn input_rows(
    stream: &CudaStream,
    k: &Kernels,
    input: Input,
    tokens: usize,
    cols: usize,
) -> Result<u64, DriverError> {
    match input {
        Input::Rows(x) => Ok(x),
        Input::Normed {
            x,
            weight,
            eps,
            scratch,
        } => {
            rms_norm(stream, k, x, weight, scratch, tokens, cols, eps)?;
            Ok(scratch)
        }
    }
}

/// A product kernel's arguments: W, x, y, then `counts` as ints.
fn product_args<const N: usize>(m: &MatrixView, x: u64, y: u64, counts: [usize; N]) -> Vec<Arg> {
    let pointers = [m.ptr, x, y].map(Arg::Ptr);
    let ints = counts.map(|v| Arg::I32(v as i32));
    pointers.into_iter().chain(ints).collect()
}

/// `mma_bf16` of the rows at `x`: into y, or with `swiglu_inter`, the SwiGLU of the
/// interleaved gate/up rows (their bias added).
#[allow(clippy::too_many_arguments)]
fn mma(
    stream: &CudaStream,
    k: &Kernels,
    m: &MatrixView,
    x: u64,
    y: u64,
    tokens: usize,
    accumulate: bool,
    swiglu_inter: Option<usize>,
) -> Result<(), DriverError> {
    let tiles = tokens.div_ceil(MMA_TOKENS);
    let wpr = mma_warps_per_row(m.rows, m.cols, k.sms, tiles);
    let grid = (tiles as u32, m.rows.div_ceil(8 / wpr * MMA_ROWS) as u32, 1);
    let (inter, bias) = match swiglu_inter {
        Some(inter) => (inter, m.bias.unwrap_or(0)),
        None => (0, 0),
    };
    let counts = [m.rows, m.cols, tokens, wpr, accumulate as usize, inter];
    let mut args = product_args(m, x, y, counts);
    args.push(Arg::Ptr(bias));
    launch(stream, &k.mma_bf16, grid, 256, &args)
}

/// Whether a product runs on the tensor cores (`mma_bf16`).
pub fn uses_tensor_cores(k: &Kernels, m: &MatrixView, tokens: usize) -> bool {
    k.tensor_cores
        && m.dtype == super::weights::DevDType::Bf16 as usize
        && tokens >= MMA_MIN_TOKENS
        && m.cols.is_multiple_of(8)
}

/// `y[t * rows + r] (+)= in[t] · W[r] (+ bias[r])` for `tokens` input rows; with `accumulate`,
/// added to what y holds (the residual add fused in). bf16 weights with tensor cores enabled:
/// `mma_bf16` from [`MMA_MIN_TOKENS`] tokens on. Otherwise GEMVs up to [`GEMV_MAX_TOKENS`]
/// tokens, tiled GEMMs beyond.
pub fn matmul(
    stream: &CudaStream,
    k: &Kernels,
    m: &MatrixView,
    input: Input,
    y: u64,
    tokens: usize,
    accumulate: bool,
) -> Result<(), DriverError> {
    let (rows, cols) = (m.rows, m.cols);
    let row_bytes = 4 * cols;
    if uses_tensor_cores(k, m, tokens) {
        let x = input_rows(stream, k, input, tokens, cols)?;
        mma(stream, k, m, x, y, tokens, accumulate, None)?;
    } else if tokens <= GEMV_MAX_TOKENS {
        let wpr = warps_per_row(rows, cols, k.sms);
        let grid = (rows.div_ceil(8 * GEMV_ROWS / wpr) as u32, 1, 1);
        for start in (0..tokens).step_by(GEMV_TOKENS_PER_PASS) {
            let t = GEMV_TOKENS_PER_PASS.min(tokens - start);
            let x_at = |x: u64| Arg::Ptr(x + (start * row_bytes) as u64);
            let y_at = Arg::Ptr(y + (start * rows * 4) as u64);
            let shape = [rows, cols, t, wpr, accumulate as usize].map(|v| Arg::I32(v as i32));
            let [r, c, tk, wp, acc] = shape;
            match input {
                Input::Rows(x) => {
                    let args = [Arg::Ptr(m.ptr), x_at(x), y_at, r, c, tk, wp, acc];
                    launch(stream, &k.gemv[m.dtype], grid, 256, &args)?;
                }
                Input::Normed { x, weight, eps, .. } => {
                    let (w, e) = (Arg::Ptr(weight), Arg::F32(eps));
                    let args = [Arg::Ptr(m.ptr), x_at(x), w, e, y_at, r, c, tk, wp, acc];
                    launch(stream, &k.gemv_norm[m.dtype], grid, 256, &args)?;
                }
            }
        }
    } else {
        let x = input_rows(stream, k, input, tokens, cols)?;
        let args = product_args(m, x, y, [rows, cols, tokens, accumulate as usize]);
        let grid = (rows.div_ceil(64) as u32, tokens.div_ceil(64) as u32, 1);
        launch(stream, &k.gemm[m.dtype], grid, 256, &args)?;
    }
    add_bias(stream, k, m, y, tokens)
}

fn add_bias(
    stream: &CudaStream,
    k: &Kernels,
    m: &MatrixView,
    y: u64,
    tokens: usize,
) -> Result<(), DriverError> {
    let Some(bias) = m.bias else { return Ok(()) };
    let n = tokens * m.rows;
    launch(
        stream,
        &k.add_bias,
        (elementwise_blocks(n), 1, 1),
        256,
        &[
            Arg::Ptr(y),
            Arg::Ptr(bias),
            Arg::I32(m.rows as i32),
            Arg::U64(n as u64),
        ],
    )
}

/// Splits an attention launch may have (`MAX_SPLITS` in attention.cu).
pub const MAX_ATTENTION_SPLITS: usize = 64;

/// One attention launch over the paged KV cache (attention.cu), as device addresses and shape.
pub struct Attention {
    /// Query rows, `q_stride` floats apart, head h at `h * d`.
    pub q: u64,
    pub q_stride: usize,
    pub keys: u64,
    pub values: u64,
    /// Block tables, each token's table offset in them, and each token's position.
    pub tables: u64,
    pub offsets: u64,
    pub positions: u64,
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Sliding window (0: none).
    pub window: usize,
    pub scale: f32,
    /// At most [`MAX_ATTENTION_SPLITS`].
    pub splits: usize,
    pub split_keys: usize,
    /// Per (token, head, split): (m, l) and the `d` weighted values.
    pub part_ml: u64,
    pub part_acc: u64,
    /// `tokens × heads` ints (at least one per block of a split), zero before the launch; the
    /// launch leaves them zero.
    pub counters: u64,
    /// `[token][heads * d]`.
    pub out: u64,
}

/// How attention blocks take the query heads: `heads` heads a block (of one KV head), `warps`
/// warps a block, `blocks` blocks a token and split.
pub struct AttentionGroups {
    pub heads: usize,
    pub warps: usize,
    pub blocks: usize,
}

/// At most 8 heads of a KV head a block (warps past 8 would not fit a block's registers), and
/// up to 8 warps: a group of 1 or 2 heads gets several warps per head.
pub fn attention_groups(heads: usize, kv_heads: usize) -> AttentionGroups {
    let per_kv = (heads / kv_heads.max(1)).max(1);
    let group = per_kv.min(8);
    AttentionGroups {
        heads: group,
        warps: group * (8 / group),
        blocks: kv_heads * per_kv.div_ceil(group),
    }
}

/// Attention of every token and head, split along the keys, the splits merged by the last
/// block of each (token, head group) to finish.
pub fn attention(stream: &CudaStream, k: &Kernels, a: &Attention) -> Result<(), DriverError> {
    debug_assert!(a.splits <= MAX_ATTENTION_SPLITS);
    let groups = attention_groups(a.heads, a.kv_heads);
    let args = [
        Arg::Ptr(a.q),
        Arg::I32(a.q_stride as i32),
        Arg::Ptr(a.keys),
        Arg::Ptr(a.values),
        Arg::Ptr(a.tables),
        Arg::Ptr(a.offsets),
        Arg::Ptr(a.positions),
        Arg::I32(a.heads as i32),
        Arg::I32(a.kv_heads as i32),
        Arg::I32(a.d as i32),
        Arg::I32(a.window as i32),
        Arg::F32(a.scale),
        Arg::I32(a.split_keys as i32),
        Arg::I32(groups.heads as i32),
        Arg::Ptr(a.part_ml),
        Arg::Ptr(a.part_acc),
        Arg::Ptr(a.counters),
        Arg::Ptr(a.out),
    ];
    let grid = (a.tokens as u32, groups.blocks as u32, a.splits as u32);
    // The kernel for the smallest bound that holds d (the backend refuses d > 256).
    let variant = match a.d {
        0..=32 => 0,
        33..=64 => 1,
        65..=128 => 2,
        _ => 3,
    };
    let func = &k.attention_split[variant];
    launch(stream, func, grid, 32 * groups.warps as u32, &args)
}

/// `out[t][i] = silu(gate_i) · up_i` (`inter` values a token) of the product of `input` with
/// the interleaved gate/up matrix `m` ([`super::weights::interleave_gate_up`]), its bias
/// added. The GEMV and the tensor cores write the SwiGLU from the product's registers; the
/// tiled GEMM writes the product to `scratch` (`tokens` rows of `m.rows`) for `silu_mul`.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_product(
    stream: &CudaStream,
    k: &Kernels,
    m: &MatrixView,
    input: Input,
    out: u64,
    scratch: u64,
    tokens: usize,
    inter: usize,
) -> Result<(), DriverError> {
    let (rows, cols) = (m.rows, m.cols);
    let bias = Arg::Ptr(m.bias.unwrap_or(0));
    if uses_tensor_cores(k, m, tokens) {
        let x = input_rows(stream, k, input, tokens, cols)?;
        mma(stream, k, m, x, out, tokens, false, Some(inter))
    } else if let (true, Input::Normed { x, weight, eps, .. }) = (tokens <= GEMV_MAX_TOKENS, input)
    {
        let wpr = warps_per_row(rows, cols, k.sms);
        let grid = (inter.div_ceil(8 / wpr) as u32, 1, 1);
        for start in (0..tokens).step_by(GEMV_TOKENS_PER_PASS) {
            let t = GEMV_TOKENS_PER_PASS.min(tokens - start);
            let args = [
                Arg::Ptr(m.ptr),
                Arg::Ptr(x + (start * cols * 4) as u64),
                Arg::Ptr(weight),
                Arg::F32(eps),
                bias,
                Arg::Ptr(out + (start * inter * 4) as u64),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
                Arg::I32(t as i32),
                Arg::I32(wpr as i32),
                Arg::I32(inter as i32),
            ];
            launch(stream, &k.gemv_norm_swiglu[m.dtype], grid, 256, &args)?;
        }
        Ok(())
    } else {
        matmul(stream, k, m, input, scratch, tokens, false)?;
        silu_mul(stream, k, scratch, out, tokens, inter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads per block, warps and blocks per token for the head layouts models have.
    #[test]
    fn attention_groups_cover_every_head_once() {
        for (heads, kv_heads, want) in [
            (32, 4, (8, 8, 4)), // GQA 8: one block per KV head
            (14, 2, (7, 7, 2)), // 7 heads a KV head: 7 warps
            (12, 4, (3, 6, 4)), // 3: two warps a head
            (8, 8, (1, 8, 8)),  // multi-head: 8 warps on one head
            (16, 1, (8, 8, 2)), // 16: two blocks a KV head
            (9, 3, (3, 6, 3)),  // odd
        ] {
            let g = attention_groups(heads, kv_heads);
            assert_eq!((g.heads, g.warps, g.blocks), want, "{heads}/{kv_heads}");
            assert!(g.warps <= 8 && g.warps.is_multiple_of(g.heads));
            // The blocks' groups hold every head: blocks per KV head × heads a block.
            assert!(g.blocks / kv_heads * g.heads >= heads / kv_heads);
        }
    }

    /// The tensor cores' warps-per-row keeps every warp at least two 32-column chunks and
    /// never exceeds a block's 8 warps.
    #[test]
    fn mma_warps_per_row_fill_the_device_within_bounds() {
        // The 1.1B model's o projection, one token tile: short, so 8 warps a row group.
        assert_eq!(mma_warps_per_row(2048, 2048, 132, 1), 8);
        // Its vocabulary projection has more rows: 4 warps a row group reach the target.
        assert_eq!(mma_warps_per_row(32000, 2048, 132, 1), 4);
        // Narrow rows cannot be shared further than two chunks a warp.
        assert_eq!(mma_warps_per_row(64, 128, 132, 1), 2);
        for (rows, cols, tiles) in [(16, 64, 1), (2560, 2048, 8), (11264, 2048, 2)] {
            let wpr = mma_warps_per_row(rows, cols, 132, tiles);
            assert!([1, 2, 4, 8].contains(&wpr));
            assert!(cols >= wpr * 64 || wpr == 1, "{rows}x{cols}: {wpr}");
        }
    }
}
