//! The executor against Hugging Face transformers: token ids and logits from `golden/*.json`.
//! Each model runs its prompts one at a time, all together as one batch, and with the prompt
//! fed in small prefill chunks; all three must give the reference tokens.

mod common;

use cllm::model::cpu::matmul::{bf16_dot_supported, Numerics};
use cllm::model::Model;
use common::greedy::{
    check_exact_runs, check_first_logits, check_tokens_before_close_call, greedy_outcomes,
    tokenize_prompts,
};
use common::{fixture, ALL_MODELS};

fn check_model(name: &str) {
    let Some(fx) = fixture(name) else { return };
    let model = Model::load(&fx.model_dir).expect("model loads");
    let prompts = tokenize_prompts(name, &model, &fx.golden);
    check_exact_runs(name, &model, &prompts, &fx.golden);
}

#[test]
fn stories260k_matches_hf() {
    check_model(ALL_MODELS[0]);
}

#[test]
fn tiny_qwen2_f32_matches_hf() {
    check_model(ALL_MODELS[1]);
}

#[test]
fn tiny_llama_f32_matches_hf() {
    check_model(ALL_MODELS[2]);
}

#[test]
fn tiny_llama_bf16_matches_hf_f32_compute() {
    check_model(ALL_MODELS[3]);
}

#[test]
fn tiny_llama_tied_f32_matches_hf() {
    check_model(ALL_MODELS[4]);
}

#[test]
fn tiny_llama_bf16_fast_numerics_within_tolerance() {
    let Some(fx) = fixture(ALL_MODELS[3]) else {
        return;
    };
    if !bf16_dot_supported() {
        eprintln!("SKIP fast-numerics tolerance: this CPU has no AVX512-BF16, fast == exact here");
    }
    let model = Model::load(&fx.model_dir).expect("model loads");
    let prompts: Vec<Vec<u32>> = fx
        .golden
        .cases
        .iter()
        .map(|c| c.input_ids.clone())
        .collect();
    let name = &fx.name;
    for chunk in [512, 3] {
        let outcomes = greedy_outcomes(
            &model,
            &prompts,
            fx.golden.max_new_tokens,
            chunk,
            Numerics::Fast,
        );
        let mut worst = 0.0f32;
        for (case, outcome) in fx.golden.cases.iter().zip(&outcomes) {
            // The tolerances the README states: tokens up to the first close call, and the
            // first-step top-5 logits within 2e-2.
            let how = format!("fast, prefill chunk {chunk}");
            check_tokens_before_close_call(name, &how, case, outcome);
            for (want, got) in check_first_logits(name, &how, case, outcome, |_| 2e-2) {
                worst = worst.max((got - want).abs());
            }
        }
        // The README quotes this figure.
        eprintln!(
            "fast numerics, prefill chunk {chunk}: largest first-step top-5 logit difference {worst:.4}"
        );
    }
}

/// CI has no GPU: the exact runs of stories260K and of the Qwen2 model (biases) again on the
/// CUDA emulator (tests/cuda_emulator), one at a time, batched and in prefill chunks.
#[test]
fn golden_runs_pass_on_the_cuda_emulator() {
    common::emulated_gpu::rerun_on_emulated_gpu(
        &["stories260k_matches_hf", "tiny_qwen2_f32_matches_hf"],
        2,
        "forward",
    );
}
