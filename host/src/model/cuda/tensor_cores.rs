//! Whether products of several tokens with bf16 weights run on the tensor cores (`mma_bf16` in
//! kernels/matmul.cu): on GPUs of compute capability 8.0 or later, unless
//! `CLLM_CUDA_TENSOR_CORES=0`, and only once a product on the device agrees with the same
//! product computed on the host. The kernel's fragment layout is written from the PTX ISA and
//! cannot be run without such a GPU, so a device whose tensor cores compute something else
//! falls back to the CUDA-core kernels, said in the log, instead of producing wrong tokens.

use super::kernels::Kernels;
use super::memory::DeviceBuffer;
use super::products::{matmul, Input, MatrixView};
use super::weights::DevDType;
use crate::model::rng::Rng;
use cudarc::driver::{CudaStream, DriverError};

/// The environment variable that turns the tensor cores off (`0`) for a comparison.
pub const ENV: &str = "CLLM_CUDA_TENSOR_CORES";

/// The largest relative error (‖got − want‖ / ‖want‖) the start-up product may have. The
/// kernel's own error is about 1e-6; a wrong fragment layout gives errors near 1.
const MAX_ERROR: f64 = 1e-4;

/// Turns the tensor cores on for `kernels` when the device has them (compute capability
/// `major`.x), they are not turned off, and the start-up product agrees. Returns why they are
/// off, or None when they are on; an error when the product could not run (a fault leaves the
/// CUDA context unusable, so there is nothing to fall back on).
pub fn enable(
    stream: &CudaStream,
    kernels: &mut Kernels,
    major: i32,
) -> Result<Option<String>, DriverError> {
    if major < 8 {
        return Ok(Some(format!(
            "compute capability {major}.x has no bf16 tensor cores"
        )));
    }
    if std::env::var(ENV).is_ok_and(|v| v.trim() == "0") {
        return Ok(Some(format!("turned off by {ENV}=0")));
    }
    kernels.tensor_cores = true;
    let result = product_error(stream, kernels);
    kernels.tensor_cores = matches!(result, Ok(err) if err <= MAX_ERROR);
    let err = result?;
    Ok((!kernels.tensor_cores).then(|| {
        format!(
            "the start-up product on the tensor cores was off by {err:.2e} (relative), more \
             than {MAX_ERROR:.0e}: the products run on the CUDA cores"
        )
    }))
}

/// The relative error of one `mma_bf16` product against the host's f64 product: 40 rows (a
/// partial row group), 264 columns (a partial 32-column chunk) and 70 tokens (two token
/// tiles, the second partial), so every edge of the kernel is on the way.
fn product_error(stream: &CudaStream, kernels: &Kernels) -> Result<f64, DriverError> {
    let (rows, cols, tokens) = (40usize, 264usize, 70usize);
    let mut rng = Rng::new(1);
    let bits: Vec<u16> = (0..rows * cols)
        .map(|_| (rng.next_signed_f32().to_bits() >> 16) as u16)
        .collect();
    let x: Vec<f32> = (0..tokens * cols).map(|_| rng.next_signed_f32()).collect();
    let cu = stream.cu_stream();
    let (wb, xb) = (
        DeviceBuffer::upload(&bits, cu)?,
        DeviceBuffer::upload(&x, cu)?,
    );
    let yb = DeviceBuffer::alloc(tokens * rows * 4)?;
    let view = MatrixView {
        ptr: wb.ptr(),
        dtype: DevDType::Bf16 as usize,
        rows,
        cols,
        bias: None,
    };
    matmul(
        stream,
        kernels,
        &view,
        Input::Rows(xb.ptr()),
        yb.ptr(),
        tokens,
        false,
    )?;
    let y: Vec<f32> = yb.read_vec(tokens * rows, cu)?;
    let want: Vec<f64> = (0..tokens)
        .flat_map(|t| (0..rows).map(move |r| (t, r)))
        .map(|(t, r)| {
            (0..cols)
                .map(|k| {
                    let w = f32::from_bits((bits[r * cols + k] as u32) << 16);
                    w as f64 * x[t * cols + k] as f64
                })
                .sum()
        })
        .collect();
    Ok(relative_error(&y, &want))
}

/// ‖got − want‖ / ‖want‖; infinite when a value is not finite (an element not written, or
/// garbage).
pub(super) fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w) * (g as f64 - w);
        den += w * w;
    }
    (num / den.max(1e-30)).sqrt()
}
