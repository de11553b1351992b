//! Models with random weights and real Llama shapes, for benchmarks without a download.

use super::config::{Architecture, ModelConfig, RopeScaling};
use super::llama::{DecoderLayer, Linear, ModelWeights};
use super::quant::random_blocks;
use super::rng::Rng;
use super::weights::{DType, Tensor};

/// The shapes `cllm bench --synthetic` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SyntheticSize {
    /// 110M parameters: hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000.
    #[value(name = "110m")]
    M110,
    /// TinyLlama 1.1B: hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632.
    #[value(name = "1b")]
    B1,
}

pub fn config(size: SyntheticSize) -> ModelConfig {
    let (hidden, layers, heads, kv_heads, inter) = match size {
        SyntheticSize::M110 => (768, 12, 12, 12, 2048),
        SyntheticSize::B1 => (2048, 22, 32, 4, 5632),
    };
    ModelConfig {
        architecture: Architecture::Llama,
        model_type: "llama".into(),
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden / heads,
        vocab_size: 32000,
        max_position_embeddings: 2048,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Random weights of `config`'s shapes in `dtype`, scaled like a trained model's (|w| ≤ 0.05).
pub fn weights(config: &ModelConfig, dtype: DType, seed: u64) -> ModelWeights {
    let mut rng = Rng::new(seed);
    let mut matrix = |rows: usize, cols: usize| random_tensor(&mut rng, dtype, rows, cols);
    let h = config.hidden_size;
    let inter = config.intermediate_size;
    let linear = |weight| Linear { weight, bias: None };
    let embed_tokens = matrix(config.vocab_size, h);
    let layers = (0..config.num_hidden_layers)
        .map(|_| DecoderLayer {
            input_layernorm: vec![1.0; h],
            q_proj: linear(matrix(config.q_dim(), h)),
            k_proj: linear(matrix(config.kv_dim(), h)),
            v_proj: linear(matrix(config.kv_dim(), h)),
            o_proj: linear(matrix(h, config.q_dim())),
            post_attention_layernorm: vec![1.0; h],
            gate_proj: linear(matrix(inter, h)),
            up_proj: linear(matrix(inter, h)),
            down_proj: linear(matrix(h, inter)),
        })
        .collect();
    let lm_head = Some(matrix(config.vocab_size, h));
    ModelWeights {
        embed_tokens,
        layers,
        norm: vec![1.0; h],
        lm_head,
    }
}

fn random_tensor(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> Tensor {
    let n = rows * cols;
    let shape = vec![rows, cols];
    match dtype {
        DType::F32 => Tensor::from_f32(
            shape,
            (0..n).map(|_| rng.next_signed_f32() * 0.05).collect(),
        ),
        DType::Bf16 | DType::F16 => {
            let mut next = || {
                let v = rng.next_signed_f32() * 0.05;
                if dtype == DType::Bf16 {
                    half::bf16::from_f32(v).to_bits()
                } else {
                    half::f16::from_f32(v).to_bits()
                }
            };
            // Huge pages, as a large model file's page cache usually gets; plain memory if
            // the system cannot map it.
            match Tensor::half_in_huge_pages(dtype, shape.clone(), |_| next()) {
                Ok(t) => t,
                Err(_) => Tensor::from_half_bits(dtype, shape, (0..n).map(|_| next()).collect()),
            }
        }
        DType::Quant(qt) => {
            let bytes = random_blocks(qt, n / qt.block_elems(), 0.01, || rng.next_signed_f32());
            Tensor::from_blocks(qt, shape, bytes)
        }
    }
}
