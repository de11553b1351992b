//! `cllm bench`: prefill and decode speed, with the machine's read bandwidth as the baseline
//! measured in the same run (decode on a CPU is bound by it).

use crate::model::config::ModelConfig;
use crate::model::cpu::pool::ThreadPool;
use crate::model::cpu::{BatchEntry, CpuExecutor, LogitRows};
use crate::model::kv_cache::{KvCache, SequenceKv};
use crate::model::llama::ModelWeights;
use crate::model::rng::Rng;
use crate::model::synthetic::{self, SyntheticSize};
use crate::model::weights::DType;
use crate::model::{kv_layout, Model};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "synthetic"])))]
pub struct BenchArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Random weights with real Llama shapes.
    #[arg(long, value_enum)]
    synthetic: Option<SyntheticSize>,
    /// Stored dtype of the synthetic weights: bf16, f16 or f32.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: DType,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded per measurement.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("unknown dtype {s:?} (bf16, f16, f32)"))
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (name, config, weights) = match (&args.model, args.synthetic) {
        (Some(dir), _) => {
            let model = Model::load(dir)?;
            (dir.display().to_string(), model.config, model.weights)
        }
        (None, Some(size)) => {
            let config = synthetic::config(size);
            eprintln!("generating random {} weights...", args.dtype.name());
            let weights = synthetic::weights(&config, args.dtype, 1);
            (format!("synthetic {size:?}"), config, weights)
        }
        (None, None) => anyhow::bail!("give --model DIR or --synthetic 110m|1b"),
    };
    let mut executor = CpuExecutor::new(&config, args.threads);
    let context = config.max_position_embeddings;
    let prompt_len = args
        .prompt_tokens
        .min(context.saturating_sub(args.decode_tokens + 1))
        .max(1);
    let decode_tokens = args.decode_tokens.min(context - prompt_len);
    let weight_bytes = weights.decode_bytes();

    let baseline_gbs = read_bandwidth_gbs(&ThreadPool::new(args.threads), weight_bytes);
    let bench = Bench {
        config: &config,
        weights: &weights,
    };
    let (prefill_tps, decode_tps) = bench.run(&mut executor, 1, prompt_len, decode_tokens)?;
    let (_, decode8_tps) = bench.run(&mut executor, 8, 64.min(prompt_len), decode_tokens)?;
    let decode_gbs = decode_tps * weight_bytes as f64 / 1e9;

    println!(
        "model: {name}  dtype: {}  weights read per token: {:.1} MB  threads: {}",
        weights.dtype().name(),
        weight_bytes as f64 / 1e6,
        executor.threads()
    );
    println!("| measurement | value |");
    println!("|---|---|");
    println!("| prefill ({prompt_len}-token prompt) | {prefill_tps:.1} tokens/s |");
    println!("| decode, batch 1 ({decode_tokens} tokens) | {decode_tps:.1} tokens/s |");
    println!("| effective weight bandwidth, decode | {decode_gbs:.1} GB/s |");
    println!("| decode, batch 8 | {decode8_tps:.1} tokens/s |");
    println!("| baseline: plain read bandwidth, same run | {baseline_gbs:.1} GB/s |");
    println!(
        "| decode bandwidth / baseline | {:.2} |",
        decode_gbs / baseline_gbs
    );
    Ok(())
}

struct Bench<'a> {
    config: &'a ModelConfig,
    weights: &'a ModelWeights,
}

impl Bench<'_> {
    /// Prefills `batch` random prompts of `prompt_len` tokens, then decodes `decode_tokens`
    /// steps for all of them. Returns (prefill tokens/s, decode tokens/s).
    fn run(
        &self,
        executor: &mut CpuExecutor,
        batch: usize,
        prompt_len: usize,
        decode_tokens: usize,
    ) -> anyhow::Result<(f64, f64)> {
        let mut rng = Rng::new(42);
        let vocab = self.config.vocab_size as u64;
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..prompt_len)
                    .map(|_| (rng.next_u64() % vocab) as u32)
                    .collect()
            })
            .collect();
        let blocks = batch * KvCache::blocks_for(prompt_len + decode_tokens);
        let mut kv = KvCache::new(kv_layout(self.config), blocks);
        let mut seqs: Vec<SequenceKv> = (0..batch).map(|_| SequenceKv::new()).collect();
        let mut logits = Vec::new();

        let start = Instant::now();
        for (seq, prompt) in seqs.iter_mut().zip(&prompts) {
            kv.reserve(seq, prompt.len() + decode_tokens)?;
            let mut entries = [BatchEntry {
                tokens: prompt,
                kv: seq,
                logits: LogitRows::Last,
            }];
            executor.forward(
                self.config,
                self.weights,
                &mut kv,
                &mut entries,
                &mut logits,
            )?;
        }
        let prefill_s = start.elapsed().as_secs_f64();

        let mut next: Vec<[u32; 1]> = vec![[1]; batch];
        let start = Instant::now();
        for _ in 0..decode_tokens {
            let mut entries: Vec<BatchEntry> = seqs
                .iter_mut()
                .zip(&next)
                .map(|(kv, token)| BatchEntry {
                    tokens: token,
                    kv,
                    logits: LogitRows::Last,
                })
                .collect();
            executor.forward(
                self.config,
                self.weights,
                &mut kv,
                &mut entries,
                &mut logits,
            )?;
            for (token, row) in next.iter_mut().zip(logits.chunks_exact(vocab as usize)) {
                *token = [crate::model::sampling::argmax(row)];
            }
        }
        let decode_s = start.elapsed().as_secs_f64();
        Ok((
            (batch * prompt_len) as f64 / prefill_s,
            (batch * decode_tokens) as f64 / decode_s,
        ))
    }
}

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
