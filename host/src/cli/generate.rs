//! `cllm generate`: one prompt, text streamed to stdout, speed on stderr.

use crate::model::cpu::matmul::Numerics;
use crate::model::driver::generate_batch;
use crate::model::executor::{open_executor, DeviceChoice, ExecutorSettings};
use crate::model::generation::GenerationParams;
use crate::model::kv_cache::KvDtype;
use crate::model::rng::Rng;
use crate::model::sampling::SamplingParams;
use crate::model::Model;
use anyhow::Context;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json), GGUF file, or
    /// folder holding one GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Folder with tokenizer.json used instead of the model's own tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens when sampling (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Penalty for tokens already in the prompt or output (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Sampling seed (the same seed gives the same text); random when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object {"input_ids", "output_ids", "text"} instead of streaming.
    #[arg(long)]
    json: bool,
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
    prompt: String,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.temperature.is_nan() || args.temperature < 0.0 {
        anyhow::bail!("--temperature must be >= 0");
    }
    if !(0.0..=1.0).contains(&args.top_p) || args.top_p == 0.0 {
        anyhow::bail!("--top-p must be in (0, 1]");
    }
    if args.repetition_penalty.is_nan() || args.repetition_penalty <= 0.0 {
        anyhow::bail!("--repetition-penalty must be > 0");
    }
    let model = Model::load_with_tokenizer(&args.model, args.tokenizer.as_deref())?;
    let input_ids = model
        .tokenizer
        .encode(&args.prompt, true)
        .context("tokenizing the prompt")?;
    let params = GenerationParams {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            do_sample: args.temperature > 0.0,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed.unwrap_or_else(Rng::fresh_seed),
            ..SamplingParams::default()
        },
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..GenerationParams::default()
    };
    let mut executor = open_executor(
        &model.config,
        &model.weights,
        &ExecutorSettings {
            device: args.device,
            threads: args.threads,
            numerics: args.numerics,
            kv_dtype: args.kv_cache_dtype,
            kv_blocks: 0, // sized by generate_batch for the prompt
            kv_memory_fraction: 1.0,
            kv_blocks_explicit: true,
        },
    )?;
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    if stream {
        write!(stdout, "{}", args.prompt)?;
        stdout.flush()?;
    }
    let start = Instant::now();
    let mut first_token_at = None;
    let prompts = [input_ids];
    let outcomes = generate_batch(
        &model,
        executor.as_mut(),
        &prompts,
        &params,
        512,
        |_, event| {
            first_token_at.get_or_insert_with(Instant::now);
            if stream {
                // A closed stdout (e.g. `| head`) must not abort generation with a panic.
                let _ = write!(stdout, "{}", event.text);
                let _ = stdout.flush();
            }
        },
    )?;
    let end = Instant::now();
    let [input_ids] = prompts;
    let generation = &outcomes[0].generation;
    let output_ids = generation.output_ids();
    if args.json {
        let json = serde_json::json!({
            "input_ids": input_ids,
            "output_ids": output_ids,
            "text": generation.text(),
        });
        writeln!(stdout, "{json}")?;
    } else {
        writeln!(stdout)?;
    }
    let first = first_token_at.unwrap_or(end);
    let prefill_s = (first - start).as_secs_f64();
    let decode_s = (end - first).as_secs_f64();
    let decoded = output_ids.len().saturating_sub(1);
    eprintln!(
        "{} prompt tokens, {} generated on {} [{}]: prefill {:.1} tokens/s, decode {:.1} tokens/s",
        input_ids.len(),
        output_ids.len(),
        executor.device().name,
        executor.device().reason,
        input_ids.len() as f64 / prefill_s.max(1e-9),
        decoded as f64 / decode_s.max(1e-9),
    );
    Ok(())
}
