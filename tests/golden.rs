//! The executor against Hugging Face transformers: token ids and logits from `golden/*.json`.
//! Each model runs its prompts one at a time, all together as one batch, and with the prompt
//! fed in small prefill chunks; all three must give the reference tokens.

mod common;

use cllm::model::cpu::matmul::{bf16_dot_supported, Numerics};
use cllm::model::cpu::CpuExecutor;
use cllm::model::driver::{generate_batch, Outcome};
use cllm::model::generation::GenerationParams;
use cllm::model::Model;
use common::{fixture, Fixture, GoldenCase, ALL_MODELS};

fn greedy(max_new_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn check_outcome(fx: &Fixture, case: &GoldenCase, outcome: &Outcome, how: &str) {
    let got = outcome.generation.output_ids();
    if got != case.output_ids.as_slice() {
        let step = got
            .iter()
            .zip(&case.output_ids)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(case.output_ids.len()));
        let margin = case.step_top1_top2_margin.get(step).copied();
        panic!(
            "{} ({how}), prompt {:?}: tokens differ from step {step} (HF top1-top2 margin there: {margin:?})\n got:  {got:?}\n want: {:?}",
            fx.name, case.prompt, case.output_ids
        );
    }
    check_first_logits(fx, case, outcome, 1e-3, how);
}

/// HF's first-step top-5 logits, each within `tolerance`.
fn check_first_logits(
    fx: &Fixture,
    case: &GoldenCase,
    outcome: &Outcome,
    tolerance: f32,
    how: &str,
) {
    let top5 = &case.first_step_top5;
    for (id, want) in top5.ids.iter().zip(&top5.values) {
        let value = outcome.first_logits[*id as usize];
        assert!(
            (value - want).abs() <= tolerance,
            "{} ({how}), prompt {:?}: first-step logit of token {id} is {value}, HF says {want}",
            fx.name,
            case.prompt
        );
    }
}

fn run(fx: &Fixture, prompts: &[Vec<u32>], chunk: usize) -> (Model, Vec<Outcome>) {
    run_with(fx, prompts, chunk, Numerics::Exact)
}

fn run_with(
    fx: &Fixture,
    prompts: &[Vec<u32>],
    chunk: usize,
    numerics: Numerics,
) -> (Model, Vec<Outcome>) {
    let model = Model::load(&fx.model_dir).expect("model loads");
    let mut executor = CpuExecutor::new(&model.config, 0, numerics);
    let params = greedy(fx.golden.max_new_tokens);
    let outcomes = generate_batch(&model, &mut executor, prompts, &params, chunk, |_, _| {})
        .expect("generates");
    (model, outcomes)
}

/// `Numerics::Fast` against the f32 reference, with the tolerances the README states:
/// first-step top-5 logits within 2e-2, and the greedy tokens identical up to the first step
/// where HF's top1-top2 margin is below 0.1 (past it, a 1e-2 difference may flip the choice).
fn check_fast_outcome(fx: &Fixture, case: &GoldenCase, outcome: &Outcome, how: &str) {
    let got = outcome.generation.output_ids();
    let close_call = case
        .step_top1_top2_margin
        .iter()
        .position(|&m| m < 0.1)
        .unwrap_or(case.output_ids.len());
    assert_eq!(
        &got[..close_call],
        &case.output_ids[..close_call],
        "{} (fast, {how}), prompt {:?}: tokens differ before step {close_call}, the first \
         whose HF margin is under 0.1",
        fx.name,
        case.prompt
    );
    check_first_logits(fx, case, outcome, 2e-2, &format!("fast, {how}"));
}

fn check_model(name: &str) {
    let Some(fx) = fixture(name) else { return };
    let model = Model::load(&fx.model_dir).expect("model loads");
    let prompts: Vec<Vec<u32>> = fx
        .golden
        .cases
        .iter()
        .map(|case| {
            let ids = model.tokenizer.encode(&case.prompt, true).expect("encodes");
            assert_eq!(
                ids, case.input_ids,
                "{name}: input ids of {:?}",
                case.prompt
            );
            ids
        })
        .collect();
    drop(model);

    // One prompt at a time.
    for (case, prompt) in fx.golden.cases.iter().zip(&prompts) {
        let (_, outcomes) = run(&fx, std::slice::from_ref(prompt), 512);
        check_outcome(&fx, case, &outcomes[0], "alone");
    }
    // All prompts as one batch through the paged executor.
    let (_, outcomes) = run(&fx, &prompts, 512);
    for (case, outcome) in fx.golden.cases.iter().zip(&outcomes) {
        check_outcome(&fx, case, outcome, "batched");
    }
    // Prompts fed three tokens per pass, still batched.
    let (_, outcomes) = run(&fx, &prompts, 3);
    for (case, outcome) in fx.golden.cases.iter().zip(&outcomes) {
        check_outcome(&fx, case, outcome, "chunked prefill");
    }
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
    let prompts: Vec<Vec<u32>> = fx
        .golden
        .cases
        .iter()
        .map(|c| c.input_ids.clone())
        .collect();
    for chunk in [512, 3] {
        let (_, outcomes) = run_with(&fx, &prompts, chunk, Numerics::Fast);
        let mut worst = 0.0f32;
        for (case, outcome) in fx.golden.cases.iter().zip(&outcomes) {
            check_fast_outcome(&fx, case, outcome, &format!("prefill chunk {chunk}"));
            let top5 = &case.first_step_top5;
            for (id, want) in top5.ids.iter().zip(&top5.values) {
                worst = worst.max((outcome.first_logits[*id as usize] - want).abs());
            }
        }
        // The README quotes this figure.
        eprintln!(
            "fast numerics, prefill chunk {chunk}: largest first-step top-5 logit difference {worst:.4}"
        );
    }
}
