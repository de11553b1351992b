//! Launches of the matrix products (kernels/matmul.cu): the GEMV, the tensor-core product
//! and the tiled GEMM, chosen by the weights' type and the token count, plain or with the
//! SwiGLU of the interleaved gate/up rows.

use super::kernels::{elementwise_blocks, rms_norm, silu_mul, Arg, Kernels};
use cudarc::driver::{CudaStream, DriverError};

/// Products of up to this many tokens run as GEMVs (`GEMV_TOKENS_PER_PASS` tokens per pass
/// over the weights); more run as tiled GEMMs.
const GEMV_MAX_TOKENS: usize = 64;
const GEMV_TOKENS_PER_PASS: usize = 8;
/// Rows one warp of the GEMV computes (`GEMV_ROWS` in matmul.cu).
const GEMV_ROWS: usize = 2;
/// A product aims for this many warps per multiprocessor (enough loads in flight to keep
/// memory busy); short matrices share each row among up to 8 warps to get there.
const WARPS_PER_SM: usize = 48;
/// Columns a GEMV warp reads per step (32 lanes × 8), and an `mma_bf16` warp.
const GEMV_CHUNK: usize = 256;
const MMA_CHUNK: usize = 32;

/// A matrix on the device as the product kernels take it.
pub struct MatrixView {
    pub ptr: u64,
    /// Index of the kernel variant: [`super::weights::DevDType`].
    pub dtype: usize,
    pub rows: usize,
    pub cols: usize,
    pub bias: Option<u64>,
}

/// Warps sharing each of a launch's `units` (a warp's rows, per token tile): the fewest (1,
/// 2, 4, 8) that give the launch enough warps, while each still gets at least two `chunk`s
/// of the `cols` columns.
fn warps_per_row(units: usize, cols: usize, sms: usize, chunk: usize) -> usize {
    let target = sms * WARPS_PER_SM;
    let mut wpr = 1;
    while wpr < 8 && units * wpr < target && cols >= wpr * 2 * 2 * chunk {
        wpr *= 2;
    }
    wpr
}

/// The GEMV's passes over the weights for `tokens` tokens: (first token, tokens).
fn gemv_passes(tokens: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..tokens)
        .step_by(GEMV_TOKENS_PER_PASS)
        .map(move |start| (start, GEMV_TOKENS_PER_PASS.min(tokens - start)))
}

/// Products of at least this many tokens with bf16 weights run on the tensor cores (when
/// enabled): one token is bound by reading the weights, and the GEMV does that best.
const MMA_MIN_TOKENS: usize = 2;
/// Rows of W one warp of `mma_bf16` computes, and tokens one block does (`MMA_ROWS`,
/// `16 * MMA_TILES_M` in matmul.cu).
const MMA_ROWS: usize = 16;
const MMA_TOKENS: usize = 64;

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
    let units = m.rows.div_ceil(MMA_ROWS) * tiles;
    let wpr = warps_per_row(units, m.cols, k.sms, MMA_CHUNK);
    let grid = (tiles as u32, m.rows.div_ceil(8 / wpr * MMA_ROWS) as u32, 1);
    let (inter, bias) = match swiglu_inter {
        Some(inter) => (inter, m.bias.unwrap_or(0)),
        None => (0, 0),
    };
    let counts = [m.rows, m.cols, tokens, wpr, accumulate as usize, inter];
    let mut args = product_args(m, x, y, counts);
    args.push(Arg::Ptr(bias));
    k.launch(stream, &k.mma_bf16, grid, 256, &args)
}

/// Whether a product runs on the tensor cores (`mma_bf16`).
fn uses_tensor_cores(k: &Kernels, m: &MatrixView, tokens: usize) -> bool {
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
        let wpr = warps_per_row(rows.div_ceil(GEMV_ROWS), cols, k.sms, GEMV_CHUNK);
        let grid = (rows.div_ceil(8 * GEMV_ROWS / wpr) as u32, 1, 1);
        for (start, t) in gemv_passes(tokens) {
            let x_at = |x: u64| Arg::Ptr(x + (start * row_bytes) as u64);
            let y_at = Arg::Ptr(y + (start * rows * 4) as u64);
            let shape = [rows, cols, t, wpr, accumulate as usize].map(|v| Arg::I32(v as i32));
            let [r, c, tk, wp, acc] = shape;
            match input {
                Input::Rows(x) => {
                    let args = [Arg::Ptr(m.ptr), x_at(x), y_at, r, c, tk, wp, acc];
                    k.launch(stream, &k.gemv[m.dtype], grid, 256, &args)?;
                }
                Input::Normed { x, weight, eps, .. } => {
                    let (w, e) = (Arg::Ptr(weight), Arg::F32(eps));
                    let args = [Arg::Ptr(m.ptr), x_at(x), w, e, y_at, r, c, tk, wp, acc];
                    k.launch(stream, &k.gemv_norm[m.dtype], grid, 256, &args)?;
                }
            }
        }
    } else {
        let x = input_rows(stream, k, input, tokens, cols)?;
        let args = product_args(m, x, y, [rows, cols, tokens, accumulate as usize]);
        let grid = (rows.div_ceil(64) as u32, tokens.div_ceil(64) as u32, 1);
        k.launch(stream, &k.gemm[m.dtype], grid, 256, &args)?;
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
    k.launch(
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
        let wpr = warps_per_row(rows.div_ceil(GEMV_ROWS), cols, k.sms, GEMV_CHUNK);
        let grid = (inter.div_ceil(8 / wpr) as u32, 1, 1);
        for (start, t) in gemv_passes(tokens) {
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
            k.launch(stream, &k.gemv_norm_swiglu[m.dtype], grid, 256, &args)?;
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

    /// The tensor cores' warps per row group: at most a block's 8 warps, each keeping at least
    /// two 32-column chunks.
    #[test]
    fn mma_warps_per_row_fill_the_device_within_bounds() {
        let mma = |rows: usize, cols, tiles| {
            warps_per_row(rows.div_ceil(MMA_ROWS) * tiles, cols, 132, MMA_CHUNK)
        };
        // The 1.1B model's o projection, one token tile: short, so 8 warps a row group.
        assert_eq!(mma(2048, 2048, 1), 8);
        // Its vocabulary projection has more rows: 4 warps a row group reach the target.
        assert_eq!(mma(32000, 2048, 1), 4);
        // Narrow rows cannot be shared further than two chunks a warp.
        assert_eq!(mma(64, 128, 1), 2);
        for (rows, cols, tiles) in [(16, 64, 1), (2560, 2048, 8), (11264, 2048, 2)] {
            let wpr = mma(rows, cols, tiles);
            assert!([1, 2, 4, 8].contains(&wpr));
            assert!(cols >= wpr * 64 || wpr == 1, "{rows}x{cols}: {wpr}");
        }
    }

    /// The GEMV's passes cover every token once, 8 at a time.
    #[test]
    fn gemv_passes_cover_the_tokens() {
        assert_eq!(gemv_passes(1).collect::<Vec<_>>(), [(0, 1)]);
        assert_eq!(gemv_passes(13).collect::<Vec<_>>(), [(0, 8), (8, 5)]);
        assert_eq!(gemv_passes(16).collect::<Vec<_>>(), [(0, 8), (8, 8)]);
    }
}
