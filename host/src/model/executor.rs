//! The executor interface: what the scheduler and the CLI drive, whichever device runs the
//! model. A backend owns the KV cache's storage and runs forward passes over batches of
//! sequences; the block bookkeeping ([`BlockPool`]) is shared code.

use super::config::ModelConfig;
use super::cpu::matmul::Numerics;
use super::cpu::pool::{PoolTimes, ThreadPool};
use super::cpu::profile::PhaseTimes;
use super::cpu::CpuExecutor;
use super::kv_cache::{cache_bytes, BlockPool, KvCache, KvDtype, SequenceKv};
use super::llama::ModelWeights;

/// One sequence's part of a forward pass.
pub struct BatchEntry<'a> {
    /// New tokens: a prompt chunk, or the one token sampled last step.
    pub tokens: &'a [u32],
    /// Its cache; must have room for `tokens` (see [`BlockPool::reserve`]). Advanced by the pass.
    pub kv: &'a mut SequenceKv,
    /// Which of this entry's tokens get logits.
    pub logits: LogitRows,
}

/// Which tokens of a batch entry the pass computes logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    None,
    /// The last token only: what sampling the next token needs.
    Last,
    /// Every token, in order (prompt log-probabilities need them).
    All,
    /// The last token's greedy choice only (the argmax of its logits, as
    /// [`crate::model::sampling::argmax`] picks it) and that choice's log-probability, in
    /// [`PassOutput::argmax`] and [`PassOutput::argmax_logprobs`] instead of a row: what
    /// greedy decoding without penalties or alternatives' log-probabilities needs (a TGI
    /// stream reports each token's own). A GPU computes both on the device and copies back 8
    /// bytes instead of the row.
    Argmax,
}

impl LogitRows {
    /// Logit rows the pass computes for an entry of `tokens` tokens.
    pub fn count(self, tokens: usize) -> usize {
        match self {
            LogitRows::None => 0,
            LogitRows::Last | LogitRows::Argmax => 1,
            LogitRows::All => tokens,
        }
    }
}

/// What a forward pass hands back.
#[derive(Default)]
pub struct PassOutput {
    /// The logit rows of the entries that asked for [`LogitRows::Last`] or
    /// [`LogitRows::All`], in batch order, `vocab_size` each.
    pub logits: Vec<f32>,
    /// The greedy choice of each entry that asked for [`LogitRows::Argmax`], in batch order.
    pub argmax: Vec<u32>,
    /// Each such choice's log-probability under its row's softmax (as
    /// [`crate::model::logprobs::logprob_of`] gives it).
    pub argmax_logprobs: Vec<f32>,
}

impl PassOutput {
    /// For a backend that computed the rows of [`LogitRows::Argmax`] entries into `logits`
    /// as it does [`LogitRows::Last`] rows: replaces each such row by its argmax and that
    /// choice's log-probability, closing the gaps.
    pub fn reduce_argmax_rows(&mut self, batch: &[BatchEntry], vocab: usize) {
        self.argmax.clear();
        self.argmax_logprobs.clear();
        if batch.iter().all(|e| e.logits != LogitRows::Argmax) {
            return;
        }
        let (mut read, mut write) = (0, 0);
        for e in batch {
            let rows = e.logits.count(e.tokens.len());
            if e.logits == LogitRows::Argmax {
                let row = &self.logits[read * vocab..(read + 1) * vocab];
                let id = super::sampling::argmax(row);
                self.argmax.push(id);
                self.argmax_logprobs
                    .push(super::logprobs::logprob_of(row, id));
            } else {
                self.logits
                    .copy_within(read * vocab..(read + rows) * vocab, write * vocab);
                write += rows;
            }
            read += rows;
        }
        self.logits.truncate(write * vocab);
    }
}

/// Why a forward pass failed. The variants that name a batch entry are found before the pass
/// changes anything (no cache advanced, no logits written), so the caller may drop that one
/// sequence and run the others again; the rest mean the whole pass is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error("batch entry {0} has no tokens")]
    EmptyEntry(usize),
    #[error("batch entry {entry}: token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { entry: usize, id: u32, vocab: usize },
    #[error(
        "batch entry {entry}: KV cache holds {capacity} slots, {needed} needed (reserve first)"
    )]
    KvNotReserved {
        entry: usize,
        needed: usize,
        capacity: usize,
    },
    #[error("batch entry {entry}: position {pos} is past the model's context of {max} tokens")]
    ContextOverflow {
        entry: usize,
        pos: usize,
        max: usize,
    },
    /// A fault injected for tests (`scheduler.debug_fail_on_token`).
    #[error("batch entry {entry}: injected fault (token id {token})")]
    Injected { entry: usize, token: u32 },
    /// The device failed (a CUDA call returned an error); the pass's results are lost.
    #[error("device error: {0}")]
    Device(String),
    /// More KV blocks were asked for while sequences still hold blocks.
    #[error("the KV cache cannot be resized while {0} blocks are in use")]
    KvInUse(usize),
}

impl ExecError {
    /// The batch entry this error belongs to, when it was found before the pass began.
    pub fn entry(&self) -> Option<usize> {
        match self {
            ExecError::EmptyEntry(entry)
            | ExecError::TokenOutOfRange { entry, .. }
            | ExecError::KvNotReserved { entry, .. }
            | ExecError::ContextOverflow { entry, .. }
            | ExecError::Injected { entry, .. } => Some(*entry),
            ExecError::Device(_) | ExecError::KvInUse(_) => None,
        }
    }
}

pub(crate) fn check_batch(config: &ModelConfig, batch: &[BatchEntry]) -> Result<(), ExecError> {
    for (i, entry) in batch.iter().enumerate() {
        if entry.tokens.is_empty() {
            return Err(ExecError::EmptyEntry(i));
        }
        if let Some(&id) = entry
            .tokens
            .iter()
            .find(|&&id| id as usize >= config.vocab_size)
        {
            return Err(ExecError::TokenOutOfRange {
                entry: i,
                id,
                vocab: config.vocab_size,
            });
        }
        let needed = entry.kv.len() + entry.tokens.len();
        if needed > entry.kv.capacity() {
            return Err(ExecError::KvNotReserved {
                entry: i,
                needed,
                capacity: entry.kv.capacity(),
            });
        }
        if needed > config.max_position_embeddings {
            return Err(ExecError::ContextOverflow {
                entry: i,
                pos: needed - 1,
                max: config.max_position_embeddings,
            });
        }
    }
    Ok(())
}

/// Runs forward passes for one model on one device.
pub trait Executor: Send {
    /// The device and its KV cache, for logs, `/info`, `/health` and `/metrics`.
    fn device(&self) -> &DeviceInfo;

    /// The KV cache's blocks: reserve them before a pass, release them when a sequence ends.
    fn blocks(&self) -> &BlockPool;
    fn blocks_mut(&mut self) -> &mut BlockPool;

    /// Grows the KV cache to at least `blocks` blocks (never shrinks it); only while no block
    /// is in use.
    fn ensure_blocks(&mut self, blocks: usize) -> Result<(), ExecError>;

    /// Runs `batch` through the model the executor was opened for (`config` and `weights`
    /// are that model's; a GPU backend uses its own copy of the weights). The logit rows and
    /// greedy choices the entries ask for go to `out` (see [`PassOutput`]); each entry's
    /// cache advances by its tokens.
    fn forward(
        &mut self,
        config: &ModelConfig,
        weights: &ModelWeights,
        batch: &mut [BatchEntry],
        out: &mut PassOutput,
    ) -> Result<(), ExecError>;

    /// Threads for the host's per-sequence work between passes (sampling many sequences'
    /// rows at once): the CPU backend lends its compute pool, idle between passes; a GPU
    /// backend keeps a pool of its own, whose threads sleep while the device computes.
    fn host_pool(&self) -> &ThreadPool;

    /// Starts or stops timing each phase of the passes, where the backend can.
    fn set_profiling(&mut self, _on: bool) {}

    /// Phase times since the last [`Executor::reset_profile`], where the backend keeps them.
    fn profile(&self) -> Option<(PhaseTimes, PoolTimes)> {
        None
    }

    fn reset_profile(&mut self) {}

    /// GB/s of a large device-to-device copy (bytes read plus written), as the ceiling that
    /// decode on a GPU is measured against; `None` on the CPU.
    fn copy_bandwidth_gbs(&mut self, _bytes: usize) -> Option<f64> {
        None
    }
}

/// Which device to run on: `auto`, `cpu`, `cuda` or `cuda:N` (config `model.device`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPU when the CUDA driver loads and a device is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device N; a start-up error when there is none.
    Cuda(usize),
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Option<DeviceChoice> {
        match s {
            "auto" => Some(DeviceChoice::Auto),
            "cpu" => Some(DeviceChoice::Cpu),
            "cuda" => Some(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceChoice::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown device {s:?} (auto, cpu, cuda, cuda:N)"))
        })
    }
}

/// What runs the passes, as reported by `/info`, `/health` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub kind: &'static str,
    /// The GPU's name (`NVIDIA H200`), or the CPU's threads (`cpu (8 threads)`).
    pub name: String,
    /// CUDA device ordinal; absent on the CPU.
    pub ordinal: Option<usize>,
    /// Device memory; absent on the CPU.
    pub memory_total_bytes: Option<u64>,
    /// Device memory left free after the weights, buffers and KV cache were allocated.
    pub memory_free_bytes: Option<u64>,
    pub kv_cache_blocks: usize,
    pub kv_cache_bytes: u64,
    /// What the KV cache stores: `f32` or `f16`.
    pub kv_cache_dtype: KvDtype,
    /// Why this device was chosen (`--device auto` falling back says why).
    pub reason: String,
    /// Whether products of two or more tokens with bf16 weights run on the GPU's tensor
    /// cores (their f32 input split into two bf16 parts); false on the CPU.
    pub tensor_cores: bool,
    /// Whether the GPU's kernels are launched as programmatic dependent launches (each may
    /// start while the one before it finishes); false on the CPU.
    pub dependent_launch: bool,
}

/// How to open an executor.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    pub device: DeviceChoice,
    /// CPU worker threads (0: one per core).
    pub threads: usize,
    pub numerics: Numerics,
    /// What the KV cache stores.
    pub kv_dtype: KvDtype,
    /// KV cache blocks on the CPU, and on the GPU when set explicitly.
    pub kv_blocks: usize,
    /// With `kv_blocks_explicit` false, the GPU's cache takes this fraction of the device
    /// memory left free after the weights and buffers.
    pub kv_memory_fraction: f64,
    pub kv_blocks_explicit: bool,
}

/// Opens the executor `settings.device` asks for. `auto` logs which device it took and why.
pub fn open_executor(
    config: &ModelConfig,
    weights: &ModelWeights,
    settings: &ExecutorSettings,
) -> anyhow::Result<Box<dyn Executor>> {
    match settings.device {
        DeviceChoice::Cpu => Ok(Box::new(CpuBackend::new(
            config,
            settings,
            "--device cpu".into(),
        ))),
        DeviceChoice::Cuda(ordinal) => {
            let backend = super::cuda::CudaBackend::open(config, weights, ordinal, settings)?;
            tracing::info!(device = %backend.device().name, "running the model on CUDA");
            Ok(Box::new(backend))
        }
        DeviceChoice::Auto => match super::cuda::CudaBackend::open(config, weights, 0, settings) {
            Ok(backend) => {
                tracing::info!(
                    device = %backend.device().name,
                    "device auto: running the model on CUDA device 0"
                );
                Ok(Box::new(backend))
            }
            Err(e) => {
                let reason = format!("device auto: no usable GPU ({e:#})");
                tracing::info!("{reason}; running the model on the CPU");
                Ok(Box::new(CpuBackend::new(config, settings, reason)))
            }
        },
    }
}

/// The CPU forward pass and its cache.
pub struct CpuBackend {
    exec: CpuExecutor,
    kv: KvCache,
    info: DeviceInfo,
}

impl CpuBackend {
    /// A CPU executor with `settings.threads`, `settings.numerics` and `settings.kv_blocks`;
    /// `reason` says why the CPU was chosen.
    pub fn new(config: &ModelConfig, settings: &ExecutorSettings, reason: String) -> Self {
        let exec = CpuExecutor::new(config, settings.threads, settings.numerics);
        let dtype = settings.kv_dtype;
        let layout = super::kv_layout(config, dtype);
        let kv_blocks = settings.kv_blocks;
        let kv = KvCache::new(layout, kv_blocks);
        let info = DeviceInfo {
            kind: "cpu",
            name: format!("cpu ({} threads)", exec.threads()),
            ordinal: None,
            memory_total_bytes: None,
            memory_free_bytes: None,
            kv_cache_blocks: kv_blocks,
            kv_cache_bytes: cache_bytes(layout, kv_blocks),
            kv_cache_dtype: dtype,
            reason,
            tensor_cores: false,
            dependent_launch: false,
        };
        CpuBackend { exec, kv, info }
    }

    /// The CPU executor itself (thread count, numerics).
    pub fn cpu(&self) -> &CpuExecutor {
        &self.exec
    }
}

impl Executor for CpuBackend {
    fn device(&self) -> &DeviceInfo {
        &self.info
    }

    fn blocks(&self) -> &BlockPool {
        self.kv.pool()
    }

    fn blocks_mut(&mut self) -> &mut BlockPool {
        self.kv.pool_mut()
    }

    fn ensure_blocks(&mut self, blocks: usize) -> Result<(), ExecError> {
        let pool = self.kv.pool();
        if pool.total_blocks() >= blocks {
            return Ok(());
        }
        if pool.used_blocks() > 0 {
            return Err(ExecError::KvInUse(pool.used_blocks()));
        }
        self.kv = KvCache::new(self.kv.layout(), blocks);
        self.info.kv_cache_blocks = blocks;
        self.info.kv_cache_bytes = cache_bytes(self.kv.layout(), blocks);
        Ok(())
    }

    fn forward(
        &mut self,
        config: &ModelConfig,
        weights: &ModelWeights,
        batch: &mut [BatchEntry],
        out: &mut PassOutput,
    ) -> Result<(), ExecError> {
        self.exec.forward(config, weights, &mut self.kv, batch, out)
    }

    fn host_pool(&self) -> &ThreadPool {
        self.exec.pool()
    }

    fn set_profiling(&mut self, on: bool) {
        self.exec.set_profiling(on);
    }

    fn profile(&self) -> Option<(PhaseTimes, PoolTimes)> {
        Some(self.exec.profile())
    }

    fn reset_profile(&mut self) {
        self.exec.reset_profile();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_rows_leave_the_logits_for_their_choices() {
        let vocab = 3;
        let tokens = [1u32, 2, 3];
        let mut kvs: Vec<SequenceKv> = (0..4).map(|_| SequenceKv::new()).collect();
        let [a, b, c, d] = &mut kvs[..] else {
            unreachable!("four caches")
        };
        let batch = [
            (&tokens[..2], a, LogitRows::Argmax),
            (&tokens[..], b, LogitRows::All),
            (&tokens[..1], c, LogitRows::None),
            (&tokens[..1], d, LogitRows::Argmax),
        ]
        .map(|(tokens, kv, logits)| BatchEntry { tokens, kv, logits });
        // Rows as a backend computes them: one per Argmax entry, three for All.
        let mut out = PassOutput {
            logits: vec![
                0.0, 5.0, 1.0, // entry 0: 1
                1.0, 2.0, 3.0, // entry 1
                4.0, 5.0, 6.0, //
                7.0, 8.0, 9.0, //
                9.0, 9.0, -1.0, // entry 3: 0 (the first on ties)
            ],
            argmax: vec![42],
            argmax_logprobs: vec![],
        };
        out.reduce_argmax_rows(&batch, vocab);
        assert_eq!(out.argmax, [1, 0]);
        let softmax_of_first = |row: [f32; 3]| {
            let total: f32 = row.iter().map(|l| (l - row[0]).exp()).sum();
            -total.ln()
        };
        let want = [
            softmax_of_first([5.0, 0.0, 1.0]),
            softmax_of_first([9.0, 9.0, -1.0]),
        ];
        for (got, want) in out.argmax_logprobs.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} {want}");
        }
        assert_eq!(out.logits, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    }
}
