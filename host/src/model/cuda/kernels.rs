//! The compiled kernels as loaded functions, the one launch helper every call goes through, and
//! the launches of the norm and SwiGLU kernels.

use super::compile::Cubins;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaStream, DriverError};
use std::ffi::c_void;
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
    /// Per KV cache type: f32, f16.
    pub rope_kv_append: [CudaFunction; 2],
    /// Per KV cache type (f32, f16) and bound on the head dim: 32, 64, 128, 256
    /// ([`super::attention::attention`] picks).
    pub attention_split: [[CudaFunction; 4]; 2],
    pub argmax_rows: CudaFunction,
    /// The dependent-launch check's writer and reader (probe.cu).
    pub probe_write: CudaFunction,
    pub probe_read: CudaFunction,
    /// Streaming multiprocessors of the device (how wide a launch must be to fill it).
    pub sms: usize,
    /// Whether products of several tokens with bf16 weights run on the tensor cores
    /// (`mma_bf16`): set by [`super::tensor_cores::enable`] once they have been checked.
    pub tensor_cores: bool,
    /// Whether kernels are launched as programmatic dependent launches (compute capability
    /// 9.0 and later): set by [`super::dependent_launch::enable`] once checked.
    pub dependent_launch: bool,
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
        let attention = |cache: &str| -> Result<[CudaFunction; 4], String> {
            let bound = |d: usize| f("attention.cu", &format!("attention_split_{cache}_d{d}"));
            Ok([bound(32)?, bound(64)?, bound(128)?, bound(256)?])
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
            rope_kv_append: [
                f("elementwise.cu", "rope_kv_append_f32")?,
                f("elementwise.cu", "rope_kv_append_f16")?,
            ],
            attention_split: [attention("f32")?, attention("f16")?],
            argmax_rows: f("sampling.cu", "argmax_rows")?,
            probe_write: f("probe.cu", "dependency_probe_write")?,
            probe_read: f("probe.cu", "dependency_probe_read")?,
            sms,
            tensor_cores: false,
            dependent_launch: false,
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

impl Kernels {
    /// Launches `func` on `stream` with `grid` blocks of `block` threads, as a programmatic
    /// dependent launch when [`Kernels::dependent_launch`] is on.
    pub fn launch(
        &self,
        stream: &CudaStream,
        func: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), DriverError> {
        launch_with(stream, func, grid, block, args, self.dependent_launch)
    }
}

/// Launches `func` on `stream` with `grid` blocks of `block` threads (`cuLaunchKernelEx`).
/// With `dependent`, the launch carries programmatic stream serialization: the kernel may be
/// scheduled before the one ahead of it in the stream has finished, and waits for it in
/// `grid_dependency_sync()` (kernels/common.cuh), which every kernel calls.
pub fn launch_with(
    stream: &CudaStream,
    func: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    args: &[Arg],
    dependent: bool,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    // cuLaunchKernelEx takes a pointer to each argument's value; `args` outlives the call.
    let mut params: Vec<*mut c_void> = args
        .iter()
        .map(|arg| match arg {
            Arg::Ptr(p) | Arg::U64(p) => p as *const u64 as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
        })
        .collect();
    // SAFETY: an all-zero attribute is a valid value of this plain C struct and union.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream.cu_stream(),
        attrs: if dependent {
            &mut attribute
        } else {
            std::ptr::null_mut()
        },
        numAttrs: dependent as u32,
    };
    // SAFETY: each kernel's arguments are built by the backend to match its signature in
    // kernels/*.cu, with pointers into live device buffers sized for the launch; `params`
    // points into `args`, and `config` and `attribute` live through the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}

/// Blocks of 256 threads for a grid-stride loop over `n` elements.
pub fn elementwise_blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 8192) as u32
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
    k.launch(
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
    k.launch(stream, &k.gather_rms_norm, grid, NORM_THREADS, &args)
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
    k.launch(
        stream,
        &k.silu_mul,
        (elementwise_blocks(n), 1, 1),
        256,
        &args,
    )
}
