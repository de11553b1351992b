//! Whether kernels are launched as programmatic dependent launches: on GPUs of compute
//! capability 9.0 and later (H100, H200), unless `CLLM_CUDA_PDL=0`, and only once, on the
//! stream and captured in a CUDA graph, a kernel launched right after a slow writer reads what
//! the writer wrote (the wait waits), and a chain of dependent products computes what the host
//! computes.
//!
//! A decode step of one sequence is ~6 short kernels a layer, each waiting for the one before
//! it: between two of them the GPU drains, then launches and fills again. Launched with
//! programmatic stream serialization, a kernel's blocks are scheduled while the kernel before
//! it finishes and issue their first weight loads (which depend on no kernel) before they wait
//! for it in `grid_dependency_sync()` (kernels/common.cuh), so that the launch and the loads'
//! latency overlap the previous kernel's tail. Results are unchanged: every kernel waits before
//! it touches any activation.

use super::kernels::{rms_norm, Arg, Kernels};
use super::memory::DeviceBuffer;
use super::products::{matmul, Input, MatrixView};
use super::tensor_cores::relative_error;
use super::weights::DevDType;
use crate::model::rng::Rng;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode};
use cudarc::driver::{CudaStream, DriverError};
use std::sync::Arc;

/// The environment variable that turns dependent launches off (`0`) for a comparison.
pub const ENV: &str = "CLLM_CUDA_PDL";

/// The largest relative error the check's chain may have (its f32 sums against f64: ~1e-7).
const MAX_ERROR: f64 = 1e-5;

/// Turns dependent launches on for `kernels` when the device has them (compute capability
/// `major`.x), they are not turned off, and the check's chain agrees with the host, on the
/// stream and in a graph. Returns why they are off, or None when they are on.
pub fn enable(stream: &Arc<CudaStream>, kernels: &mut Kernels, major: i32) -> Option<String> {
    if major < 9 {
        return Some(format!(
            "compute capability {major}.x has no programmatic dependent launch (9.0 and later)"
        ));
    }
    if std::env::var(ENV).is_ok_and(|v| v.trim() == "0") {
        return Some(format!("turned off by {ENV}=0"));
    }
    kernels.dependent_launch = true;
    let why = match (probe(stream, kernels), chain_errors(stream, kernels)) {
        (Err(e), _) | (_, Err(e)) => Some(format!("a dependent launch failed: {e:?}")),
        (Ok(read), _) if read != [PROBE_VALUE; 2] => Some(format!(
            "a dependent kernel read {read:?} (on the stream, in a graph) before its writer \
             ({PROBE_VALUE}) finished"
        )),
        (_, Ok((eager, graph))) if eager > MAX_ERROR || graph > MAX_ERROR => Some(format!(
            "the start-up chain of dependent kernels was off by {eager:.2e} on the stream and \
             {graph:.2e} in a graph (relative), more than {MAX_ERROR:.0e}"
        )),
        _ => None,
    };
    kernels.dependent_launch = why.is_none();
    why
}

/// What the probe's writer writes, after sleeping [`PROBE_SLEEP_US`] microseconds.
const PROBE_VALUE: i32 = 0x5eed;
const PROBE_SLEEP_US: i32 = 100;

/// What a reader launched right after a slow writer (probe.cu) reads, on the stream and in a
/// captured graph: the writer's value when the reader waited for it, 0 (the cell's value
/// before) when it did not.
fn probe(stream: &Arc<CudaStream>, kernels: &Kernels) -> Result<[i32; 2], DriverError> {
    let cu = stream.cu_stream();
    let (cell, out) = (DeviceBuffer::alloc(4)?, DeviceBuffer::alloc(4)?);
    let pair = || -> Result<(), DriverError> {
        let write = [
            Arg::Ptr(cell.ptr()),
            Arg::I32(PROBE_VALUE),
            Arg::I32(PROBE_SLEEP_US),
        ];
        kernels.launch(stream, &kernels.probe_write, (1, 1, 1), 32, &write)?;
        let read = [Arg::Ptr(cell.ptr()), Arg::Ptr(out.ptr())];
        kernels.launch(stream, &kernels.probe_read, (1, 1, 1), 32, &read)
    };
    let mut read = [0i32; 2];
    cell.zero(cu)?;
    pair()?;
    out.read(&mut read[..1], cu)?;
    cell.zero(cu)?;
    out.zero(cu)?;
    replay_captured(stream, pair)?;
    out.read(&mut read[1..], cu)?;
    Ok(read)
}

/// The relative errors of a chain of three dependent kernels (an RMSNorm of 3 rows, a GEMV
/// of its output, a GEMV of that adding into its input) against the host's f64 result: run
/// on the stream, then captured in a graph and replayed.
fn chain_errors(stream: &Arc<CudaStream>, kernels: &Kernels) -> Result<(f64, f64), DriverError> {
    let (n, tokens, eps) = (256usize, 3usize, 1e-5f32);
    let mut rng = Rng::new(7);
    let w: Vec<f32> = (0..n * n).map(|_| rng.next_signed_f32() * 0.1).collect();
    let norm: Vec<f32> = (0..n).map(|_| 1.0 + rng.next_signed_f32() * 0.5).collect();
    let x: Vec<f32> = (0..tokens * n).map(|_| rng.next_signed_f32()).collect();
    let want = host_chain(&w, &norm, &x, n, eps as f64);
    let cu = stream.cu_stream();
    let (wb, nb) = (
        DeviceBuffer::upload(&w, cu)?,
        DeviceBuffer::upload(&norm, cu)?,
    );
    let (a, b) = (
        DeviceBuffer::alloc(tokens * n * 4)?,
        DeviceBuffer::alloc(tokens * n * 4)?,
    );
    let view = MatrixView {
        ptr: wb.ptr(),
        dtype: DevDType::F32 as usize,
        rows: n,
        cols: n,
        bias: None,
    };
    let xb = DeviceBuffer::upload(&x, cu)?;
    // x is only read: the chain gives the same result each time it runs.
    let chain = || -> Result<(), DriverError> {
        rms_norm(stream, kernels, xb.ptr(), nb.ptr(), a.ptr(), tokens, n, eps)?;
        matmul(
            stream,
            kernels,
            &view,
            Input::Rows(a.ptr()),
            b.ptr(),
            tokens,
            false,
        )?;
        matmul(
            stream,
            kernels,
            &view,
            Input::Rows(b.ptr()),
            a.ptr(),
            tokens,
            true,
        )
    };
    chain()?;
    let eager = relative_error(&a.read_vec(tokens * n, cu)?, &want);
    // Captured and replayed, with the outputs zeroed first so that the graph must write them.
    a.zero(cu)?;
    b.zero(cu)?;
    replay_captured(stream, chain)?;
    let in_graph = relative_error(&a.read_vec(tokens * n, cu)?, &want);
    Ok((eager, in_graph))
}

/// Captures the launches `launch` makes on `stream` into a graph and launches the graph once.
fn replay_captured(
    stream: &Arc<CudaStream>,
    launch: impl FnOnce() -> Result<(), DriverError>,
) -> Result<(), DriverError> {
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = launch();
    // The capture ends whatever happened, so that the stream is usable again.
    let graph = stream.end_capture(CUgraphInstantiate_flags(0))?;
    captured?;
    graph
        .ok_or(DriverError(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED))?
        .launch()
}

/// What the chain computes, in f64: a = rmsnorm(x) · norm, b = a · Wᵀ, out = a + b · Wᵀ.
fn host_chain(w: &[f32], norm: &[f32], x: &[f32], n: usize, eps: f64) -> Vec<f64> {
    let product = |v: &[f64]| -> Vec<f64> {
        (0..n)
            .map(|r| (0..n).map(|k| w[r * n + k] as f64 * v[k]).sum())
            .collect()
    };
    x.chunks(n)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            let a: Vec<f64> = (0..n)
                .map(|i| norm[i] as f64 * (row[i] as f64 * inv))
                .collect();
            let b = product(&a);
            let c = product(&b);
            a.iter().zip(c).map(|(a, c)| a + c).collect::<Vec<_>>()
        })
        .collect()
}
