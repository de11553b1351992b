//! The CUDA executor: weights uploaded once, the paged KV cache in device memory, and a
//! forward pass that launches the kernels of `kernels/` layer by layer on one stream. Logits
//! come back to the host, where sampling runs as on the CPU.

use super::attention::{attention, attention_groups, Attention, MAX_ATTENTION_SPLITS};
use super::compile::compile_all;
use super::kernels::{gather_rms_norm, Arg, Kernels};
use super::memory::{DeviceBuffer, Growable};
use super::products::{matmul, swiglu_product, Input};
use super::profile::{events_per_pass, EventProfile};
use super::weights::{unsupported_dtype, upload, DevWeights};
use crate::model::config::ModelConfig;
use crate::model::cpu::pool::{PoolTimes, ThreadPool};
use crate::model::cpu::profile::{Phase, PhaseTimes};
use crate::model::executor::{
    check_batch, BatchEntry, DeviceInfo, ExecError, Executor, ExecutorSettings, LogitRows,
    PassOutput,
};
use crate::model::kv_cache::{block_bytes, cache_bytes, BlockPool, KvDtype, KvLayout, BLOCK_SIZE};
use crate::model::llama::ModelWeights;
use crate::model::rope::Rope;
use anyhow::Context;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaStream, DriverError};
use std::sync::Arc;

/// Attention splits aim for this many blocks (of up to 8 warps) per streaming multiprocessor
/// (head dims to 64 take 64 registers a thread: 4 blocks fit).
const ATTENTION_BLOCKS_PER_SM: usize = 4;
/// Keys per split at least (fewer would spend more on merging than on attending).
const MIN_SPLIT_KEYS: usize = 16;
const MAX_HEAD_DIM: usize = 256;
/// Decode steps of up to this many sequences run as captured CUDA graphs.
const MAX_GRAPH_BATCH: usize = 256;

fn dev(e: DriverError) -> ExecError {
    ExecError::Device(format!("{e:?}"))
}

/// Model shape, as the kernels take it.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    q_dim: usize,
    kv_dim: usize,
    qkv_rows: usize,
    inter: usize,
    vocab: usize,
    eps: f32,
    window: usize,
    layers: usize,
}

impl Dims {
    fn new(c: &ModelConfig) -> Dims {
        Dims {
            h: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            d: c.head_dim,
            q_dim: c.q_dim(),
            kv_dim: c.kv_dim(),
            qkv_rows: c.q_dim() + 2 * c.kv_dim(),
            inter: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps,
            window: c.sliding_window.unwrap_or(0),
            layers: c.num_hidden_layers,
        }
    }
}

/// Per-pass inputs built on the host, kept to avoid allocating in the decode loop.
#[derive(Default)]
struct HostScratch {
    slots: Vec<i32>,
    positions: Vec<i32>,
    /// Where each token's block table starts in `tables`.
    offsets: Vec<i32>,
    tables: Vec<i32>,
    /// The tokens that get logits: those whose rows go back first, then those reduced to
    /// their argmax on the device.
    rows: Vec<i32>,
    argmax_rows: Vec<i32>,
    /// The device's greedy choices as read back: ids, then their log-probabilities' bits.
    chosen: Vec<u32>,
    /// ids | slots | positions | offsets | rows | tables: one upload.
    ints: Vec<i32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// cos | sin: one upload.
    angles: Vec<f32>,
}

/// Activation buffers, grown to the largest pass seen.
#[derive(Default)]
struct Buffers {
    x: Growable,
    normed: Growable,
    qkv: Growable,
    attn: Growable,
    gate_up: Growable,
    act: Growable,
    ints: Growable,
    angles: Growable,
    part_ml: Growable,
    part_acc: Growable,
    /// The attention's per-(token, head) split counters: zeroed when (re)allocated, left zero
    /// by every launch.
    counters: Growable,
    last: Growable,
    logits: Growable,
    /// The argmax of each logit row, then each one's log-probability: one copy back.
    chosen: Growable,
}

/// Device addresses and shape of one forward pass.
#[derive(Clone, Copy, Default)]
struct Pass {
    n: usize,
    m: usize,
    splits: usize,
    split_keys: usize,
    x: u64,
    normed: u64,
    qkv: u64,
    attn: u64,
    gate_up: u64,
    act: u64,
    part_ml: u64,
    part_acc: u64,
    counters: u64,
    last: u64,
    logits: u64,
    /// `m` ids, then `m` f32 log-probabilities.
    chosen: u64,
    /// Whether any row is wanted only as its argmax (then every row's is computed).
    argmax: bool,
    ids: u64,
    slots: u64,
    positions: u64,
    offsets: u64,
    rows: u64,
    tables: u64,
    cos: u64,
    sin: u64,
}

impl Buffers {
    /// Sizes every buffer for `n` tokens, `m` logit rows, `splits` attention splits and
    /// `ints` packed integers; the addresses, and whether any buffer moved.
    fn size(
        &mut self,
        dims: &Dims,
        n: usize,
        m: usize,
        splits: usize,
        ints: usize,
    ) -> Result<(Pass, bool), ExecError> {
        let f = 4usize;
        let mut grew = false;
        let mut take = |g: &mut Growable, bytes: usize| -> Result<u64, ExecError> {
            let (ptr, moved) = g.sized(bytes).map_err(dev)?;
            grew |= moved;
            Ok(ptr)
        };
        let half = dims.d / 2;
        let ints_ptr = take(&mut self.ints, ints * 4)?;
        let angles = take(&mut self.angles, 2 * n * half * f)?;
        let int_at = |i: usize| ints_ptr + (i * 4) as u64;
        let pass = Pass {
            x: take(&mut self.x, n * dims.h * f)?,
            normed: take(&mut self.normed, n * dims.h * f)?,
            qkv: take(&mut self.qkv, n * dims.qkv_rows * f)?,
            attn: take(&mut self.attn, n * dims.q_dim * f)?,
            gate_up: take(
                &mut self.gate_up,
                n * 2 * dims.inter.next_multiple_of(8) * f,
            )?,
            act: take(&mut self.act, n * dims.inter * f)?,
            part_ml: take(&mut self.part_ml, n * dims.heads * splits * 2 * f)?,
            part_acc: take(&mut self.part_acc, n * dims.heads * splits * dims.d * f)?,
            counters: take(&mut self.counters, n * dims.heads * 4)?,
            last: take(&mut self.last, m.max(1) * dims.h * f)?,
            logits: take(&mut self.logits, m.max(1) * dims.vocab * f)?,
            chosen: take(&mut self.chosen, m.max(1) * (4 + f))?,
            ids: int_at(0),
            slots: int_at(n),
            positions: int_at(2 * n),
            offsets: int_at(3 * n),
            rows: int_at(4 * n),
            tables: int_at(4 * n + m),
            cos: angles,
            sin: angles + (n * half * f) as u64,
            ..Pass::default()
        };
        Ok((pass, grew))
    }
}

/// A captured decode step. SAFETY of Send: the graph's handles are plain driver handles,
/// used only by the backend that owns them, with its context bound to the calling thread.
struct Graph(cudarc::driver::CudaGraph);

// SAFETY: see [`Graph`].
unsafe impl Send for Graph {}

/// The KV cache in device memory: all layers' keys, then all layers' values, in `dtype`.
struct DeviceKv {
    keys: DeviceBuffer,
    values: DeviceBuffer,
    layer_bytes: usize,
    dtype: KvDtype,
}

impl DeviceKv {
    fn alloc(
        dims: &Dims,
        blocks: usize,
        dtype: KvDtype,
        stream: &CudaStream,
    ) -> Result<DeviceKv, DriverError> {
        let layer_bytes = blocks * BLOCK_SIZE * dims.kv_dim * dtype.bytes();
        let keys = DeviceBuffer::alloc(layer_bytes * dims.layers)?;
        let values = DeviceBuffer::alloc(layer_bytes * dims.layers)?;
        // Unwritten slots are never read, but zeros keep a stray read finite.
        keys.zero(stream.cu_stream())?;
        values.zero(stream.cu_stream())?;
        Ok(DeviceKv {
            keys,
            values,
            layer_bytes,
            dtype,
        })
    }
}

pub struct CudaBackend {
    // Device memory first: fields drop in order, and the context must outlive them.
    weights: DevWeights,
    bufs: Buffers,
    kv: DeviceKv,
    kernels: Kernels,
    pool: BlockPool,
    dims: Dims,
    rope: Rope,
    host: HostScratch,
    /// Captured decode steps by (tokens, attention splits, keys per split, argmax on the
    /// device).
    graphs: std::collections::HashMap<(usize, usize, usize, bool), Graph>,
    /// Phase times, while `cllm bench --profile` asks for them.
    profile: Option<EventProfile>,
    sms: usize,
    info: DeviceInfo,
    /// Host threads for the scheduler's per-sequence work between passes (`model.threads`).
    host_threads: ThreadPool,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

/// Whether the CUDA driver library can be loaded at all (`libcuda.so`).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A CUDA context with the kernels compiled and loaded for its architecture.
pub(super) struct OpenDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Kernels,
    /// `sm_90`.
    pub arch: String,
    pub name: String,
    /// Streaming multiprocessors.
    pub sms: usize,
    /// Why products do not run on the tensor cores (None: they do).
    pub tensor_cores_off: Option<String>,
    /// Why kernels are not launched as programmatic dependent launches (None: they are).
    pub dependent_launch_off: Option<String>,
}

/// Opens CUDA device `ordinal`: checks the driver library first (cudarc panics without it),
/// creates the context and one stream, and compiles and loads the kernels.
pub(super) fn open_device(ordinal: usize) -> anyhow::Result<OpenDevice> {
    if !driver_present() {
        anyhow::bail!("the CUDA driver library (libcuda.so) is not installed");
    }
    let count = CudaContext::device_count().map_err(|e| anyhow::anyhow!("cuInit: {e:?}"))?;
    if ordinal >= count.max(0) as usize {
        anyhow::bail!("no CUDA device {ordinal} ({count} present)");
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| anyhow::anyhow!("creating the CUDA context: {e:?}"))?;
    // One stream and raw pointers: cudarc's per-buffer event tracking is not needed.
    // SAFETY: every launch and copy of the backend goes through its one stream.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let arch = format!("sm_{major}{minor}");
    let cubins = compile_all(&arch).map_err(|e| anyhow::anyhow!("compiling the kernels: {e}"))?;
    let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap_or(1)
        .max(1) as usize;
    let mut kernels = Kernels::load(&ctx, &cubins, sms).map_err(|e| anyhow::anyhow!(e))?;
    let dependent_launch_off = super::dependent_launch::enable(&stream, &mut kernels, major);
    // A fault in its check (not a refused launch) leaves the context unusable: say so here,
    // not as the next check's failure.
    if let (Some(why), Err(e)) = (&dependent_launch_off, stream.synchronize()) {
        anyhow::bail!(
            "the programmatic dependent launch start-up check left the CUDA context unusable \
             ({why}; then {e:?}); set {}=0 to skip it",
            super::dependent_launch::ENV
        );
    }
    match &dependent_launch_off {
        None => tracing::info!("kernels are launched as programmatic dependent launches"),
        Some(why) => tracing::info!("programmatic dependent launch not used: {why}"),
    }
    let tensor_cores_off = super::tensor_cores::enable(&stream, &mut kernels, major)
        .map_err(|e| anyhow::anyhow!("the tensor cores' start-up check failed: {e:?}"))?;
    match &tensor_cores_off {
        None => tracing::info!("products of several tokens with bf16 weights use the tensor cores"),
        Some(why) => tracing::info!("tensor cores not used: {why}"),
    }
    Ok(OpenDevice {
        ctx,
        stream,
        kernels,
        arch,
        name,
        sms,
        tensor_cores_off,
        dependent_launch_off,
    })
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` for `model`: compiles the kernels for its architecture,
    /// uploads the weights and allocates the KV cache. Fails (never panics) when there is no
    /// driver, no such device, no NVRTC, or weights the kernels cannot read.
    pub fn open(
        config: &ModelConfig,
        weights: &ModelWeights,
        ordinal: usize,
        settings: &ExecutorSettings,
    ) -> anyhow::Result<Self> {
        if let Some(dtype) = unsupported_dtype(weights) {
            anyhow::bail!(
                "the CUDA kernels read f32, f16 and bf16 weights; this model has {dtype} tensors \
                 (run it with --device cpu)"
            );
        }
        let dims = Dims::new(config);
        if dims.d > MAX_HEAD_DIM || !dims.d.is_multiple_of(2) {
            anyhow::bail!(
                "head_dim {} is not supported on CUDA (even, at most {MAX_HEAD_DIM})",
                dims.d
            );
        }
        let device = open_device(ordinal)?;
        let (ctx, stream, kernels) = (device.ctx, device.stream, device.kernels);
        let (arch, name, sms) = (device.arch, device.name, device.sms);
        let weights = upload(weights, stream.cu_stream())
            .map_err(|e| anyhow::anyhow!("uploading the weights: {e:?}"))?;
        let kv_dtype = settings.kv_dtype;
        let per_block = block_bytes(crate::model::kv_layout(config, kv_dtype));
        let (free, total) = ctx.mem_get_info().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let blocks = if settings.kv_blocks_explicit {
            settings.kv_blocks
        } else {
            let budget = (free as f64 * settings.kv_memory_fraction) as usize;
            (budget / per_block.max(1)).min(u32::MAX as usize)
        };
        // Sized from memory, the cache still holds one full-context request when the caller's
        // own count does (the server's always does; the CLI passes 0 and grows the cache for
        // its prompts through `ensure_blocks`).
        let min_blocks = BlockPool::blocks_for(config.max_position_embeddings + 1);
        let blocks = blocks.max(settings.kv_blocks.min(min_blocks)).max(1);
        let kv = DeviceKv::alloc(&dims, blocks, kv_dtype, &stream)
            .with_context(|| format!("allocating a KV cache of {blocks} blocks"))
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        stream.synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let (free_after, _) = ctx.mem_get_info().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let info = DeviceInfo {
            kind: "cuda",
            name: format!("{name} ({arch})"),
            ordinal: Some(ordinal),
            memory_total_bytes: Some(total as u64),
            memory_free_bytes: Some(free_after as u64),
            kv_cache_blocks: blocks,
            kv_cache_bytes: cache_bytes(crate::model::kv_layout(config, kv_dtype), blocks),
            kv_cache_dtype: kv_dtype,
            reason: match settings.device {
                crate::model::executor::DeviceChoice::Auto => {
                    format!("device auto: CUDA device {ordinal} found")
                }
                other => format!("--device {other}"),
            },
            tensor_cores: kernels.tensor_cores,
            dependent_launch: kernels.dependent_launch,
        };
        tracing::info!(
            device = %info.name,
            weights_mb = weights.bytes >> 20,
            kv_blocks = blocks,
            kv_mb = info.kv_cache_bytes >> 20,
            "CUDA backend ready"
        );
        Ok(CudaBackend {
            weights,
            bufs: Buffers::default(),
            kv,
            kernels,
            pool: BlockPool::new(blocks),
            dims,
            rope: Rope::new(config),
            host: HostScratch::default(),
            graphs: Default::default(),
            profile: None,
            sms,
            info,
            host_threads: ThreadPool::new(settings.threads),
            stream,
            ctx,
        })
    }

    /// Every kernel of one forward pass, on the stream (or into a graph being captured):
    /// six launches a layer when the products are GEMVs (the q/k/v and gate/up GEMVs apply
    /// the RMSNorm to their input), eight on the tensor cores and nine with tiled GEMMs (the
    /// norms run first, and a tiled gate/up product is followed by the SwiGLU kernel). The
    /// residual adds are the o and down products' (they add into the residual stream x), RoPE
    /// and the KV append are one kernel, and the gate/up product writes the SwiGLU. `mark` is
    /// called as each phase's last kernel has been launched (to record a profiling event); a
    /// layer's norms count in the phases of the products they feed.
    fn launch_pass(
        &self,
        p: &Pass,
        mark: &mut dyn FnMut(Phase) -> Result<(), DriverError>,
    ) -> Result<(), DriverError> {
        let (dims, k, st, w) = (&self.dims, &self.kernels, &self.stream, &self.weights);
        let (ni, hi) = (p.n as u32, dims.h as i32);
        let eps = dims.eps;
        let scale = 1.0 / (dims.d as f32).sqrt();
        k.launch(
            st,
            &k.embed[w.embed.dtype as usize],
            (ni, 1, 1),
            256,
            &[
                Arg::Ptr(w.embed.buf.ptr()),
                Arg::Ptr(p.ids),
                Arg::Ptr(p.x),
                Arg::I32(hi),
            ],
        )?;
        mark(Phase::Embed)?;
        // The RMSNorm of the residual stream x with `weight`, as a product's input (a GEMV
        // applies it as it reads x, so its time is the product's).
        let normed = |weight: u64| Input::Normed {
            x: p.x,
            weight,
            eps,
            scratch: p.normed,
        };
        let f16_cache = self.kv.dtype == KvDtype::F16;
        for (li, layer) in w.layers.iter().enumerate() {
            let qkv = &layer.qkv.view();
            matmul(
                st,
                k,
                qkv,
                normed(layer.input_norm.ptr()),
                p.qkv,
                p.n,
                false,
            )?;
            mark(Phase::QkvProj)?;
            let layer_off = (li * self.kv.layer_bytes) as u64;
            let (kc, vc) = (
                self.kv.keys.ptr() + layer_off,
                self.kv.values.ptr() + layer_off,
            );
            let stride = Arg::I32(dims.qkv_rows as i32);
            let rope_args = [
                Arg::Ptr(p.qkv),
                stride,
                Arg::I32(dims.heads as i32),
                Arg::I32(dims.kv_heads as i32),
                Arg::I32(dims.d as i32),
                Arg::Ptr(p.cos),
                Arg::Ptr(p.sin),
                Arg::Ptr(p.slots),
                Arg::Ptr(kc),
                Arg::Ptr(vc),
            ];
            let rope = &k.rope_kv_append[f16_cache as usize];
            k.launch(st, rope, (ni, 1, 1), 128, &rope_args)?;
            mark(Phase::RopeKv)?;
            let heads = Attention {
                q: p.qkv,
                q_stride: dims.qkv_rows,
                keys: kc,
                values: vc,
                f16_cache,
                tables: p.tables,
                offsets: p.offsets,
                positions: p.positions,
                tokens: p.n,
                heads: dims.heads,
                kv_heads: dims.kv_heads,
                d: dims.d,
                window: dims.window,
                scale,
                splits: p.splits,
                split_keys: p.split_keys,
                part_ml: p.part_ml,
                part_acc: p.part_acc,
                counters: p.counters,
                out: p.attn,
            };
            attention(st, k, &heads)?;
            // x += attn · Wo, x += SwiGLU(...) · Wdown: the residual adds are the products'.
            mark(Phase::Attention)?;
            matmul(st, k, &layer.o.view(), Input::Rows(p.attn), p.x, p.n, true)?;
            mark(Phase::OProj)?;
            // The SwiGLU is part of the gate/up product (its kernel writes it; a tiled GEMM is
            // followed by silu_mul), timed with it: the element-wise phase stays empty here.
            let gate_up = &layer.gate_up.view();
            let input = normed(layer.post_norm.ptr());
            let (out, scratch) = (p.act, p.gate_up);
            swiglu_product(st, k, gate_up, input, out, scratch, p.n, dims.inter)?;
            mark(Phase::GateUpProj)?;
            mark(Phase::Elementwise)?;
            matmul(
                st,
                k,
                &layer.down.view(),
                Input::Rows(p.act),
                p.x,
                p.n,
                true,
            )?;
            mark(Phase::DownProj)?;
        }
        if p.m > 0 {
            let norm = w.norm.ptr();
            gather_rms_norm(st, k, p.x, p.rows, norm, p.last, p.m, dims.h, eps)?;
            mark(Phase::Norm)?;
            let input = Input::Rows(p.last);
            matmul(st, k, &w.lm_head().view(), input, p.logits, p.m, false)?;
            if p.argmax {
                // Greedy choices on the device: 8 bytes back a row (its id and log-probability)
                // instead of a vocabulary's floats, and no pass over the row on the host.
                let args = [
                    Arg::Ptr(p.logits),
                    Arg::I32(dims.vocab as i32),
                    Arg::Ptr(p.chosen),
                    Arg::Ptr(p.chosen + (p.m * 4) as u64),
                ];
                k.launch(st, &k.argmax_rows, (p.m as u32, 1, 1), 1024, &args)?;
            }
            mark(Phase::LmHead)?;
        }
        Ok(())
    }

    /// GB/s (read + written) of copying a buffer of `bytes` (1–2 GiB) device to device,
    /// the best of 10 copies.
    fn copy_bandwidth(&mut self, bytes: usize) -> Result<f64, DriverError> {
        self.ctx.bind_to_thread()?;
        let len = bytes.clamp(1 << 30, 2 << 30);
        let (src, dst) = (DeviceBuffer::alloc(len)?, DeviceBuffer::alloc(len)?);
        src.zero(self.stream.cu_stream())?;
        let mut best = 0.0f64;
        for _ in 0..10 {
            let start = std::time::Instant::now();
            // SAFETY: both buffers hold `len` bytes.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst.ptr(),
                    src.ptr(),
                    len,
                    self.stream.cu_stream(),
                )?;
            }
            self.stream.synchronize()?;
            best = best.max(2.0 * len as f64 / start.elapsed().as_secs_f64() / 1e9);
        }
        Ok(best)
    }
}

/// How many splits the attention of a pass over `tokens` queries in `groups` blocks a token
/// (groups of heads sharing a KV head, [`super::attention::attention_groups`]) uses, the
/// longest attending to `longest` keys, on `sms` multiprocessors; and keys per split.
fn attention_splits(sms: usize, groups: usize, tokens: usize, longest: usize) -> (usize, usize) {
    let target = ATTENTION_BLOCKS_PER_SM * sms;
    let by_occupancy = target.div_ceil(tokens * groups);
    let by_length = longest.div_ceil(MIN_SPLIT_KEYS);
    let fit = by_occupancy.min(by_length).clamp(1, MAX_ATTENTION_SPLITS);
    // A power of two, and keys rounded up to MIN_SPLIT_KEYS, so that the shape (and a captured
    // graph) changes twice per doubling of the context while the splits grow, and then every
    // MIN_SPLIT_KEYS * splits tokens; splits past the context are empty and merge as nothing.
    let splits = 1 << fit.ilog2();
    let keys = longest.div_ceil(splits).next_multiple_of(MIN_SPLIT_KEYS);
    (splits, keys)
}

impl Executor for CudaBackend {
    fn device(&self) -> &DeviceInfo {
        &self.info
    }

    fn blocks(&self) -> &BlockPool {
        &self.pool
    }

    fn blocks_mut(&mut self) -> &mut BlockPool {
        &mut self.pool
    }

    fn ensure_blocks(&mut self, blocks: usize) -> Result<(), ExecError> {
        if self.pool.total_blocks() >= blocks {
            return Ok(());
        }
        if self.pool.used_blocks() > 0 {
            return Err(ExecError::KvInUse(self.pool.used_blocks()));
        }
        self.ctx.bind_to_thread().map_err(dev)?;
        // Free the old cache before taking the new one; graphs hold its address.
        self.graphs.clear();
        let dtype = self.kv.dtype;
        self.kv = DeviceKv::alloc(&self.dims, 0, dtype, &self.stream).map_err(dev)?;
        self.kv = DeviceKv::alloc(&self.dims, blocks, dtype, &self.stream).map_err(dev)?;
        self.pool = BlockPool::new(blocks);
        self.info.kv_cache_blocks = blocks;
        let layout = KvLayout {
            num_layers: self.dims.layers,
            kv_dim: self.dims.kv_dim,
            dtype,
        };
        self.info.kv_cache_bytes = cache_bytes(layout, blocks);
        Ok(())
    }

    fn copy_bandwidth_gbs(&mut self, bytes: usize) -> Option<f64> {
        self.copy_bandwidth(bytes).ok()
    }

    fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| {
            let events = events_per_pass(self.dims.layers);
            EventProfile::new(&self.stream, events)
        });
    }

    /// GPU time per phase; the GPU has no thread pool, so its times are empty.
    fn profile(&self) -> Option<(PhaseTimes, PoolTimes)> {
        self.profile
            .as_ref()
            .map(|p| (p.times().clone(), PoolTimes::default()))
    }

    fn reset_profile(&mut self) {
        if let Some(p) = self.profile.as_mut() {
            p.reset();
        }
    }

    fn host_pool(&self) -> &ThreadPool {
        &self.host_threads
    }

    fn forward(
        &mut self,
        config: &ModelConfig,
        _weights: &ModelWeights,
        batch: &mut [BatchEntry],
        out: &mut PassOutput,
    ) -> Result<(), ExecError> {
        check_batch(config, batch)?;
        self.ctx.bind_to_thread().map_err(dev)?;
        let dims = self.dims;
        let half = dims.d / 2;
        let n: usize = batch.iter().map(|e| e.tokens.len()).sum();

        // Per-token inputs: ids, cache slots, positions, block tables, rotary angles.
        let host = &mut self.host;
        for v in [
            &mut host.slots,
            &mut host.positions,
            &mut host.offsets,
            &mut host.tables,
            &mut host.rows,
            &mut host.argmax_rows,
            &mut host.ints,
        ] {
            v.clear();
        }
        host.cos.resize(n * half, 0.0);
        host.sin.resize(n * half, 0.0);
        let mut longest = 1;
        let (mut t, mut end) = (0, 0);
        for entry in batch.iter() {
            let offset = host.tables.len() as i32;
            host.tables
                .extend(entry.kv.blocks().iter().map(|&b| b as i32));
            for pos in entry.kv.len()..entry.kv.len() + entry.tokens.len() {
                host.slots.push(entry.kv.slot(pos) as i32);
                host.positions.push(pos as i32);
                host.offsets.push(offset);
                let span = if dims.window > 0 {
                    (pos + 1).min(dims.window)
                } else {
                    pos + 1
                };
                longest = longest.max(span);
                let range = t * half..(t + 1) * half;
                self.rope
                    .angles(pos, &mut host.cos[range.clone()], &mut host.sin[range]);
                t += 1;
            }
            let start = end;
            end += entry.tokens.len();
            match entry.logits {
                LogitRows::None => {}
                LogitRows::Last => host.rows.push(end as i32 - 1),
                LogitRows::All => host.rows.extend(start as i32..end as i32),
                LogitRows::Argmax => host.argmax_rows.push(end as i32 - 1),
            }
        }
        // Rows that go back whole first, so that they are one copy.
        let whole_rows = host.rows.len();
        host.rows.extend_from_slice(&host.argmax_rows);
        let m = host.rows.len();
        for entry in batch.iter() {
            host.ints.extend(entry.tokens.iter().map(|&id| id as i32));
        }
        for part in [
            &host.slots,
            &host.positions,
            &host.offsets,
            &host.rows,
            &host.tables,
        ] {
            host.ints.extend_from_slice(part);
        }
        host.angles.clear();
        host.angles.extend_from_slice(&host.cos);
        host.angles.extend_from_slice(&host.sin);

        let groups = attention_groups(dims.heads, dims.kv_heads).blocks;
        let (splits, split_keys) = attention_splits(self.sms, groups, n, longest);
        let s = self.stream.cu_stream();
        let (pass, grew) = self.bufs.size(&dims, n, m, splits, self.host.ints.len())?;
        if grew {
            // Captured graphs hold the old buffers' addresses; a new counter buffer starts at
            // zero, as the attention kernel expects (and leaves) it.
            self.graphs.clear();
            let counters = self.bufs.counters.at_least(0).map_err(dev)?;
            counters.zero(s).map_err(dev)?;
        }
        let pass = Pass {
            n,
            m,
            splits,
            split_keys,
            argmax: whole_rows < m,
            ..pass
        };
        let ints = self.bufs.ints.at_least(0).map_err(dev)?;
        ints.write(&self.host.ints, s).map_err(dev)?;
        let angles = self.bufs.angles.at_least(0).map_err(dev)?;
        angles.write(&self.host.angles, s).map_err(dev)?;

        // Decode steps (one token per sequence) replay a CUDA graph per shape: hundreds of
        // small launches cost more than the GPU's time for a small batch.
        let decode = m == n && batch.iter().all(|e| e.tokens.len() == 1);
        if let Some(mut profile) = self.profile.take() {
            let st = &self.stream;
            let launched = profile
                .begin(st)
                .and_then(|()| self.launch_pass(&pass, &mut |phase| profile.end(st, phase)));
            // Put back before any error leaves, so profiling stays on.
            let collected = launched.and_then(|()| profile.collect());
            self.profile = Some(profile);
            collected.map_err(dev)?;
        } else if decode && n <= MAX_GRAPH_BATCH {
            let key = (n, splits, split_keys, pass.argmax);
            if !self.graphs.contains_key(&key) {
                self.stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(dev)?;
                let launched = self.launch_pass(&pass, &mut |_| Ok(()));
                let graph = self
                    .stream
                    .end_capture(CUgraphInstantiate_flags(0))
                    .map_err(dev)?;
                launched.map_err(dev)?;
                let graph = graph.ok_or_else(|| ExecError::Device("empty CUDA graph".into()))?;
                self.graphs.insert(key, Graph(graph));
            }
            self.graphs[&key].0.launch().map_err(dev)?;
        } else {
            self.launch_pass(&pass, &mut |_| Ok(())).map_err(dev)?;
        }
        out.logits.resize(whole_rows * dims.vocab, 0.0);
        out.argmax.clear();
        out.argmax_logprobs.clear();
        if pass.argmax {
            let chosen = &mut self.host.chosen;
            chosen.resize(2 * m, 0);
            let device = self.bufs.chosen.at_least(0).map_err(dev)?;
            device.read(chosen.as_mut_slice(), s).map_err(dev)?;
            out.argmax.extend_from_slice(&chosen[whole_rows..m]);
            let logprobs = chosen[m + whole_rows..].iter().map(|&b| f32::from_bits(b));
            out.argmax_logprobs.extend(logprobs);
        }
        if whole_rows > 0 {
            let rows = self.bufs.logits.at_least(0).map_err(dev)?;
            rows.read(out.logits.as_mut_slice(), s).map_err(dev)?;
        } else {
            self.stream.synchronize().map_err(dev)?;
        }
        for entry in batch.iter_mut() {
            entry.kv.advance(entry.tokens.len());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits are powers of two up to the maximum, their keys multiples of the minimum that
    /// cover the longest context; short contexts and wide batches take one split.
    #[test]
    fn attention_splits_are_powers_of_two_that_cover_the_context() {
        for (groups, tokens, longest) in [
            (4, 1, 512),
            (4, 1, 4096),
            (4, 64, 512),
            (8, 1, 17),
            (4, 1, 1),
        ] {
            let (splits, keys) = attention_splits(132, groups, tokens, longest);
            assert!(splits.is_power_of_two() && splits <= MAX_ATTENTION_SPLITS);
            assert!(keys.is_multiple_of(MIN_SPLIT_KEYS) && splits * keys >= longest);
        }
        // One sequence of 512 tokens on 132 multiprocessors: 32 splits of 16 keys.
        assert_eq!(attention_splits(132, 4, 1, 512), (32, 16));
        // 64 sequences fill the device with 2 splits.
        assert_eq!(attention_splits(132, 4, 64, 512).0, 2);
        assert_eq!(attention_splits(132, 4, 1, 1), (1, 16));
    }
}
