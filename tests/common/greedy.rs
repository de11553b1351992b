//! Greedy generation of golden prompts, and the checks against the reference the golden tests
//! share (`tests/golden.rs` for Hugging Face folders, `tests/gguf.rs` for GGUF files).

use super::{Golden, GoldenCase};
use cllm::model::cpu::matmul::Numerics;
use cllm::model::driver::{generate_batch, Outcome};
use cllm::model::executor::{open_executor, DeviceChoice, ExecutorSettings};
use cllm::model::generation::GenerationParams;
use cllm::model::kv_cache::KvDtype;
use cllm::model::Model;

/// Exactly `tokens` greedy tokens for each prompt (EOS does not stop them), all prompts as
/// one batch, prompts fed `chunk` tokens per pass, over an f32 KV cache.
pub fn greedy_outcomes(
    model: &Model,
    prompts: &[Vec<u32>],
    tokens: usize,
    chunk: usize,
    numerics: Numerics,
) -> Vec<Outcome> {
    greedy_outcomes_with(model, prompts, tokens, chunk, numerics, KvDtype::F32)
}

/// [`greedy_outcomes`] over a KV cache of `kv_dtype`.
pub fn greedy_outcomes_with(
    model: &Model,
    prompts: &[Vec<u32>],
    tokens: usize,
    chunk: usize,
    numerics: Numerics,
    kv_dtype: KvDtype,
) -> Vec<Outcome> {
    let mut executor = executor_for(model, numerics, kv_dtype);
    let params = GenerationParams {
        max_new_tokens: tokens,
        ignore_eos: true,
        ..Default::default()
    };
    generate_batch(model, executor.as_mut(), prompts, &params, chunk, |_, _| {}).expect("generates")
}

/// Each prompt's top1-top2 logit margin at every greedy step (alone, exact numerics): where a
/// reference's margin is small, a rounding of the logits may flip its choice.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn greedy_margins(model: &Model, prompts: &[Vec<u32>], tokens: usize) -> Vec<Vec<f32>> {
    let mut executor = executor_for(model, Numerics::Exact, KvDtype::F32);
    let params = GenerationParams {
        max_new_tokens: tokens,
        ignore_eos: true,
        logprobs: Some(2),
        ..Default::default()
    };
    let mut margins = vec![Vec::new(); prompts.len()];
    generate_batch(
        model,
        executor.as_mut(),
        prompts,
        &params,
        512,
        |i, event| {
            if let Some(lp) = &event.logprobs {
                margins[i].push(lp.top[0].1 - lp.top[1].1);
            }
        },
    )
    .expect("generates");
    margins
}

/// An executor for `model` on the test device, with every thread and the cache it needs.
fn executor_for(
    model: &Model,
    numerics: Numerics,
    kv_dtype: KvDtype,
) -> Box<dyn cllm::model::executor::Executor> {
    let settings = ExecutorSettings {
        device: test_device(model),
        threads: 0,
        numerics,
        kv_dtype,
        kv_blocks: 0,
        kv_memory_fraction: 1.0,
        kv_blocks_explicit: true,
    };
    open_executor(&model.config, &model.weights, &settings).expect("opens the executor")
}

/// Where the golden checks run: the CPU, or the device `CLLM_TEST_DEVICE` names
/// ([`super::test_device`]). Quantized models run on the CPU, the only backend with quantized
/// kernels, and say so.
pub fn test_device(model: &Model) -> DeviceChoice {
    let device = super::test_device();
    if device != DeviceChoice::Cpu
        && matches!(model.weights.dtype(), cllm::model::weights::DType::Quant(_))
    {
        eprintln!("CPU ONLY: {} has quantized weights", model.dir.display());
        return DeviceChoice::Cpu;
    }
    device
}

/// The golden prompts tokenized by the model's own tokenizer, checked against the golden ids.
pub fn tokenize_prompts(name: &str, model: &Model, golden: &Golden) -> Vec<Vec<u32>> {
    golden
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
        .collect()
}

/// The greedy tokens equal the reference's.
pub fn check_tokens(name: &str, how: &str, case: &GoldenCase, outcome: &Outcome) {
    let got = outcome.generation.output_ids();
    if got != case.output_ids.as_slice() {
        let step = got
            .iter()
            .zip(&case.output_ids)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(case.output_ids.len()));
        let margin = case.step_top1_top2_margin.get(step).copied();
        panic!(
            "{name} ({how}), prompt {:?}: tokens differ from step {step} (HF top1-top2 margin there: {margin:?})\n got:  {got:?}\n want: {:?}",
            case.prompt, case.output_ids
        );
    }
}

/// The greedy tokens equal the reference's up to the first step whose reference top1-top2
/// margin is below 0.1 (past it, a 1e-2 difference in the logits may flip the choice).
pub fn check_tokens_before_close_call(name: &str, how: &str, case: &GoldenCase, outcome: &Outcome) {
    let got = outcome.generation.output_ids();
    let close_call = case
        .step_top1_top2_margin
        .iter()
        .position(|&m| m < 0.1)
        .unwrap_or(case.output_ids.len());
    assert_eq!(
        &got[..close_call],
        &case.output_ids[..close_call],
        "{name} ({how}), prompt {:?}: tokens differ before step {close_call}, the first \
         whose HF margin is under 0.1",
        case.prompt
    );
}

/// The reference's first-step top-5 logits, each within `tolerance(reference value)`;
/// returns the `(reference, got)` pairs.
pub fn check_first_logits(
    name: &str,
    how: &str,
    case: &GoldenCase,
    outcome: &Outcome,
    tolerance: impl Fn(f32) -> f32,
) -> Vec<(f32, f32)> {
    let top5 = &case.first_step_top5;
    top5.ids
        .iter()
        .zip(&top5.values)
        .map(|(&id, &want)| {
            let value = outcome.first_logits[id as usize];
            assert!(
                (value - want).abs() <= tolerance(want),
                "{name} ({how}), prompt {:?}: first-step logit of token {id} is {value}, HF says {want}",
                case.prompt
            );
            (want, value)
        })
        .collect()
}

/// Exact numerics against the reference: each prompt alone, all as one batch, and fed three
/// tokens per pass; greedy tokens identical and first-step top-5 logits within 1e-3.
pub fn check_exact_runs(name: &str, model: &Model, prompts: &[Vec<u32>], golden: &Golden) {
    let check = |how: &str, case: &GoldenCase, outcome: &Outcome| {
        check_tokens(name, how, case, outcome);
        check_first_logits(name, how, case, outcome, |_| 1e-3);
    };
    let tokens = golden.max_new_tokens;
    for (case, prompt) in golden.cases.iter().zip(prompts) {
        let one = std::slice::from_ref(prompt);
        check(
            "alone",
            case,
            &greedy_outcomes(model, one, tokens, 512, Numerics::Exact)[0],
        );
    }
    for (chunk, how) in [(512, "batched"), (3, "chunked prefill")] {
        let outcomes = greedy_outcomes(model, prompts, tokens, chunk, Numerics::Exact);
        for (case, outcome) in golden.cases.iter().zip(&outcomes) {
            check(how, case, outcome);
        }
    }
}
