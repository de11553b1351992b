//! `cllm bench`: prefill and decode speed, with the machine's read bandwidth as the baseline
//! measured in the same run (decode on a CPU is bound by it).

use crate::model::config::ModelConfig;
use crate::model::cpu::matmul::Numerics;
use crate::model::cpu::pool::{PoolTimes, ThreadPool};
use crate::model::cpu::profile::{Phase, PhaseTimes};
use crate::model::executor::{
    open_executor, BatchEntry, DeviceChoice, Executor, ExecutorSettings, LogitRows, PassOutput,
};
use crate::model::gguf;
use crate::model::kv_cache::{BlockPool, KvDtype, SequenceKv};
use crate::model::llama::ModelWeights;
use crate::model::rng::Rng;
use crate::model::synthetic::{self, SyntheticSize};
use crate::model::weights::{DType, SafetensorsStore};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "synthetic"])))]
pub struct BenchArgs {
    /// Hugging Face model folder (config.json and safetensors; no tokenizer needed), GGUF
    /// file, or folder holding one GGUF file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Random weights with real Llama shapes.
    #[arg(long, value_enum)]
    synthetic: Option<SyntheticSize>,
    /// Stored dtype of the synthetic weights: bf16, f16, f32, or a GGML quantization (q8_0,
    /// q4_0, q4_1, q5_0, q5_1, q4_k, q6_k; random blocks).
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: DType,
    /// Prompt tokens for the prefill measurement, prefilled in one pass (the mean rate of 3
    /// passes is reported, after a warm-up pass); decode is measured after them. 0: no
    /// prefill, decode from an empty context.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded per measurement.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Sequences decoded together for the batched measurements: one size or a list
    /// (`1,8,32,64`); 0 skips them.
    #[arg(long, default_value = "8", value_delimiter = ',')]
    batch: Vec<usize>,
    /// auto, cpu, cuda or cuda:N: where the model runs.
    #[arg(long, default_value = "auto", value_parser = super::parse_device)]
    device: DeviceChoice,
    /// CPU worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// fast or exact: how matrix products compute (see model.numerics).
    #[arg(long, default_value = "fast", value_parser = super::parse_numerics)]
    numerics: Numerics,
    /// f32 or f16: what the KV cache stores (see scheduler.kv_cache_dtype).
    #[arg(long, default_value = "f32", value_parser = super::parse_kv_dtype)]
    kv_cache_dtype: KvDtype,
    /// Also print where the time of one prefill pass and one decode step goes, phase by
    /// phase (measured in an extra run, since reading the clock costs a little).
    #[arg(long)]
    profile: bool,
    /// Sequences decoded together in the `--profile` run (its decode step is one step of all
    /// of them; each is prefilled alone first).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    profile_batch: u32,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| {
        format!("unknown dtype {s:?} (bf16, f16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q6_k)")
    })
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (name, config, weights) = match (&args.model, args.synthetic) {
        (Some(path), _) => match gguf::find(path)? {
            Some(file) => {
                let opened = gguf::GgufModel::open(&file)?;
                let weights = ModelWeights::load(&opened.store, &opened.config)?;
                (file.display().to_string(), opened.config, weights)
            }
            None => {
                let config = ModelConfig::from_file(&path.join("config.json"))?;
                let store = SafetensorsStore::open(path)?;
                let weights = ModelWeights::load(&store, &config)?;
                (path.display().to_string(), config, weights)
            }
        },
        (None, Some(size)) => {
            let config = synthetic::config(size);
            if !args.json {
                eprintln!("generating random {} weights...", args.dtype.name());
            }
            let weights = synthetic::weights(&config, args.dtype, 1);
            (format!("synthetic {size:?}"), config, weights)
        }
        (None, None) => anyhow::bail!("give --model DIR or --synthetic 110m|1b"),
    };
    let mut executor = open_executor(
        &config,
        &weights,
        &ExecutorSettings {
            device: args.device,
            threads: args.threads,
            numerics: args.numerics,
            kv_dtype: args.kv_cache_dtype,
            kv_blocks: 0, // each run sizes the cache it needs
            kv_memory_fraction: 1.0,
            kv_blocks_explicit: true,
        },
    )?;
    let executor = executor.as_mut();
    let device = executor.device().clone();
    let context = config.max_position_embeddings;
    let prompt_len = args
        .prompt_tokens
        .min(context.saturating_sub(args.decode_tokens + 1));
    let decode_tokens = args.decode_tokens.min(context - prompt_len).max(1);
    let weight_bytes = weights.decode_bytes();

    let (baseline_gbs, baseline_name) = match executor.copy_bandwidth_gbs(weight_bytes) {
        Some(gbs) => (gbs, "device copy bandwidth (bytes read + written)"),
        None => (
            read_bandwidth_gbs(&ThreadPool::new(args.threads), weight_bytes),
            "plain read bandwidth",
        ),
    };
    let bench = Bench {
        config: &config,
        weights: &weights,
    };
    // Warm up at full size, as llama-bench does: fault in memory-mapped weights and size
    // every buffer (and the cache) the measured passes use.
    bench.run(executor, 1, prompt_len, 2)?;
    let mut single = bench.run(executor, 1, prompt_len, decode_tokens)?;
    // A prefill is one pass, which this shared machine's noise moves a lot: report the mean
    // rate of several (llama-bench averages 5 by default).
    if let Some(first) = single.prefill_tps {
        let mut seconds = prompt_len as f64 / first;
        for _ in 1..PREFILL_PASSES {
            let run = bench.run(executor, 1, prompt_len, 1)?;
            seconds += prompt_len as f64 / run.prefill_tps.unwrap_or(f64::INFINITY);
        }
        single.prefill_tps = Some((PREFILL_PASSES * prompt_len) as f64 / seconds);
    }
    let mut batched = Vec::new();
    for &size in args.batch.iter().filter(|&&b| b > 0) {
        let run = bench.run(executor, size, 64.min(prompt_len), decode_tokens)?;
        batched.push((size, run.decode_tps));
    }
    let decode_gbs = single.decode_tps * weight_bytes as f64 / 1e9;
    let profiled = if args.profile {
        executor.set_profiling(true);
        let batch = args.profile_batch as usize;
        let run = bench.run(executor, batch, prompt_len, decode_tokens)?;
        executor.set_profiling(false);
        Some(run)
    } else {
        None
    };
    let numerics = if device.kind == "cpu" {
        effective_numerics(args.numerics, &weights)
    } else if device.tensor_cores && weights.dtype() == DType::Bf16 {
        "f32 accumulation; products of 2+ tokens on the tensor cores, their input split into \
         two bf16 parts"
    } else {
        "exact (f32 accumulation, weights in their stored type)"
    };

    if args.json {
        let report = serde_json::json!({
            "model": name,
            "dtype": weights.dtype().name(),
            "numerics": numerics,
            "device": device,
            "prompt_tokens": prompt_len,
            "decode_tokens": decode_tokens,
            "prefill_tokens_per_s": single.prefill_tps,
            "decode_tokens_per_s": single.decode_tps,
            "batch": batched.first().map(|b| b.0),
            "decode_batch_tokens_per_s": batched.first().map(|b| b.1),
            "batches": batched
                .iter()
                .map(|(size, tps)| serde_json::json!({"batch": size, "decode_tokens_per_s": tps}))
                .collect::<Vec<_>>(),
            "decode_weight_gbs": decode_gbs,
            "baseline_gbs": baseline_gbs,
            "baseline": baseline_name,
            // The name earlier versions gave the CPU's read bandwidth.
            "baseline_read_gbs": (device.kind == "cpu").then_some(baseline_gbs),
        });
        println!("{report}");
        return Ok(());
    }
    println!(
        "model: {name}  dtype: {}  numerics: {numerics}  kv cache: {}  weights read per token: {:.1} MB  device: {}",
        weights.dtype().name(),
        device.kv_cache_dtype.name(),
        weight_bytes as f64 / 1e6,
        device.name
    );
    println!("| measurement | value |");
    println!("|---|---|");
    if let Some(tps) = single.prefill_tps {
        println!("| prefill ({prompt_len}-token prompt) | {tps:.1} tokens/s |");
    }
    println!(
        "| decode, batch 1 ({decode_tokens} tokens after {prompt_len}) | {:.1} tokens/s |",
        single.decode_tps
    );
    println!("| effective weight bandwidth, decode | {decode_gbs:.1} GB/s |");
    for (size, tps) in &batched {
        println!(
            "| decode, batch {size} | {tps:.1} tokens/s ({:.1}× batch 1) |",
            tps / single.decode_tps
        );
    }
    println!("| baseline: {baseline_name}, same run | {baseline_gbs:.1} GB/s |");
    println!(
        "| decode bandwidth / baseline | {:.2} |",
        decode_gbs / baseline_gbs
    );
    if let Some(run) = profiled {
        let batch = args.profile_batch as usize;
        print_profile(&run, batch, prompt_len, decode_tokens, device.kind != "cpu");
    }
    Ok(())
}

/// The numerics the matrix products of these weights actually use on this CPU.
/// Judged from the first layer's q projection (the layers' matrices share one dtype); the
/// embedding is a lookup and does not say how products compute.
fn effective_numerics(asked: Numerics, weights: &ModelWeights) -> &'static str {
    let (main, _) = asked.precisions();
    let Some(layer) = weights.layers.first() else {
        return "exact (f32)";
    };
    let data = layer.q_proj.weight.data();
    if main.uses_bf16_dot(&data) {
        "fast (bf16 activations, AVX512-BF16)"
    } else if main.uses_half_input(&data) {
        "fast (f16 activations for one token)"
    } else if main.uses_integer_dot(&data) {
        "fast (integer products, AVX512-VNNI: two-byte activations for up to 16 tokens, i16 beyond)"
    } else {
        "exact (f32)"
    }
}

/// The phase tables of a profiled run of `batch` sequences: one prefill pass, and the mean
/// decode step. `gpu`: the times are a GPU's, between CUDA events, and there is no thread pool.
fn print_profile(
    run: &RunResult,
    batch: usize,
    prompt_len: usize,
    decode_tokens: usize,
    gpu: bool,
) {
    let step = match batch {
        1 => "decode step".to_string(),
        n => format!("decode step, {n} sequences"),
    };
    let sections = [
        (
            format!("prefill pass ({prompt_len} tokens)"),
            &run.prefill_profile,
        ),
        (
            format!("{step} (mean of {decode_tokens}, after {prompt_len})"),
            &run.decode_profile,
        ),
    ];
    for (title, profile) in sections {
        let Some((phases, pool)) = profile else {
            continue;
        };
        let passes = phases.passes.max(1) as f64;
        let total = phases.total() as f64;
        println!();
        println!("{title}: {:.3} ms", total / passes / 1e6);
        println!("| phase | ms | share |");
        println!("|---|---|---|");
        let row = |name: &str, ns: u64| {
            println!(
                "| {name} | {:.3} | {:.1}% |",
                ns as f64 / passes / 1e6,
                100.0 * ns as f64 / total
            );
        };
        for phase in Phase::ALL {
            row(phase.name(), phases.get(phase));
        }
        let matmul: u64 = Phase::ALL
            .iter()
            .filter(|p| p.is_matmul())
            .map(|&p| phases.get(p))
            .sum();
        row("all matmuls", matmul);
        if gpu {
            println!(
                "| (GPU time between CUDA events at phase boundaries; profiled passes are launched without a CUDA graph) | | |"
            );
            continue;
        }
        println!(
            "| thread pool: {} jobs, {:.3} ms wall; idle thread time (wake-up, claiming, waiting for the slowest) | {:.3} | {:.1}% of pooled thread time |",
            pool.runs as f64 / passes,
            pool.wall_ns as f64 / passes / 1e6,
            pool.idle_ns() as f64 / passes / 1e6,
            100.0 * pool.idle_ns() as f64 / (pool.threads as u64 * pool.wall_ns).max(1) as f64
        );
    }
}

struct Bench<'a> {
    config: &'a ModelConfig,
    weights: &'a ModelWeights,
}

type Profile = Option<(PhaseTimes, PoolTimes)>;

struct RunResult {
    /// None without a prompt.
    prefill_tps: Option<f64>,
    decode_tps: f64,
    /// Set when the executor was profiling: the prefill passes and the decode steps apart.
    prefill_profile: Profile,
    decode_profile: Profile,
}

impl Bench<'_> {
    /// Prefills `batch` random prompts of `prompt_len` tokens (one pass each), then decodes
    /// `decode_tokens` steps for all of them.
    fn run(
        &self,
        executor: &mut dyn Executor,
        batch: usize,
        prompt_len: usize,
        decode_tokens: usize,
    ) -> anyhow::Result<RunResult> {
        let mut rng = Rng::new(42);
        let vocab = self.config.vocab_size as u64;
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..prompt_len)
                    .map(|_| (rng.next_u64() % vocab) as u32)
                    .collect()
            })
            .collect();
        let blocks = batch * BlockPool::blocks_for(prompt_len + decode_tokens);
        executor.ensure_blocks(blocks)?;
        let mut seqs: Vec<SequenceKv> = (0..batch).map(|_| SequenceKv::new()).collect();
        let mut out = PassOutput::default();

        executor.reset_profile();
        let start = Instant::now();
        for (seq, prompt) in seqs.iter_mut().zip(&prompts) {
            executor
                .blocks_mut()
                .reserve(seq, prompt.len() + decode_tokens)?;
            if prompt.is_empty() {
                continue;
            }
            let mut entries = [BatchEntry {
                tokens: prompt,
                kv: seq,
                logits: LogitRows::Last,
            }];
            executor.forward(self.config, self.weights, &mut entries, &mut out)?;
        }
        let prefill_s = start.elapsed().as_secs_f64();
        let prefill_profile = executor.profile();
        executor.reset_profile();

        let mut next: Vec<[u32; 1]> = vec![[1]; batch];
        let start = Instant::now();
        for _ in 0..decode_tokens {
            let mut entries: Vec<BatchEntry> = seqs
                .iter_mut()
                .zip(&next)
                .map(|(kv, token)| BatchEntry {
                    tokens: token,
                    kv,
                    logits: LogitRows::Argmax,
                })
                .collect();
            // Greedy decoding: the executor picks each next token (on a GPU, on the device;
            // in the profile, part of the lm_head phase), as it does for the server's greedy
            // requests.
            executor.forward(self.config, self.weights, &mut entries, &mut out)?;
            for (token, &id) in next.iter_mut().zip(&out.argmax) {
                *token = [id];
            }
        }
        let decode_s = start.elapsed().as_secs_f64();
        for seq in &mut seqs {
            executor.blocks_mut().release(seq);
        }
        let profiled = |p: Profile| p.filter(|p| p.0.passes > 0);
        Ok(RunResult {
            prefill_tps: (prompt_len > 0).then(|| (batch * prompt_len) as f64 / prefill_s),
            decode_tps: (batch * decode_tokens) as f64 / decode_s,
            prefill_profile: profiled(prefill_profile),
            decode_profile: profiled(executor.profile()),
        })
    }
}

/// Prefill passes whose mean rate the prefill measurement reports.
const PREFILL_PASSES: usize = 3;

/// GB/s for summing a buffer as large as the weights (capped at 1 GiB), split across the pool.
fn read_bandwidth_gbs(pool: &ThreadPool, bytes: usize) -> f64 {
    let len = (bytes.min(1 << 30) / 4).max(1 << 20);
    let data: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
    let parts = pool.threads();
    let chunk = len.div_ceil(parts);
    let sums: Vec<std::sync::Mutex<f32>> = (0..parts).map(|_| Default::default()).collect();
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        pool.run(parts, &|p| {
            let slice = &data[(p * chunk).min(len)..((p + 1) * chunk).min(len)];
            let s = crate::model::cpu::matmul::dot(slice, slice);
            if let Ok(mut sum) = sums[p].lock() {
                *sum += s;
            }
        });
        best = best.max((len * 4) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}
