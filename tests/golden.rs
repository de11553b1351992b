//! The executor against Hugging Face transformers: token ids and logits from `golden/*.json`.
//! Each model runs its prompts one at a time, all together as one batch, and with the prompt
//! fed in small prefill chunks; all three must give the reference tokens.

mod common;

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
    let top5 = &case.first_step_top5;
    for (id, want) in top5.ids.iter().zip(&top5.values) {
        let value = outcome.first_logits[*id as usize];
        assert!(
            (value - want).abs() <= 1e-3,
            "{} ({how}), prompt {:?}: first-step logit of token {id} is {value}, HF says {want}",
            fx.name,
            case.prompt
        );
    }
}

fn run(fx: &Fixture, prompts: &[Vec<u32>], chunk: usize) -> (Model, Vec<Outcome>) {
    let model = Model::load(&fx.model_dir).expect("model loads");
    let mut executor = CpuExecutor::new(&model.config, 0);
    let params = greedy(fx.golden.max_new_tokens);
    let outcomes = generate_batch(&model, &mut executor, prompts, &params, chunk, |_, _| {})
        .expect("generates");
    (model, outcomes)
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
