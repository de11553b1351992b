//! The weights of a Llama-family decoder (llama, mistral, qwen2), under their HF names.

use super::config::ModelConfig;
use super::error::Result;
use super::weights::{DType, Tensor, TensorSource};

/// A linear layer: `[out, in]` weight and an optional bias (widened to f32).
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
}

pub struct DecoderLayer {
    pub input_layernorm: Vec<f32>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl DecoderLayer {
    /// The layer's seven matrices: q, k, v, o, gate, up, down.
    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

pub struct ModelWeights {
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    /// `model.norm.weight`.
    pub norm: Vec<f32>,
    /// `lm_head.weight`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
}

impl ModelWeights {
    /// Loads and shape-checks every tensor the config calls for.
    pub fn load(store: &dyn TensorSource, config: &ModelConfig) -> Result<Self> {
        let h = config.hidden_size;
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            Ok(store.tensor(name, &[len])?.to_f32_vec())
        };
        let linear = |name: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear> {
            Ok(Linear {
                weight: store.tensor(&format!("{name}.weight"), &[rows, cols])?,
                bias: if bias {
                    Some(vector(&format!("{name}.bias"), rows)?)
                } else {
                    None
                },
            })
        };
        let embed_tokens = store.tensor("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (qkv, o, mlp) = (config.qkv_bias, config.o_bias, config.mlp_bias);
            let inter = config.intermediate_size;
            layers.push(DecoderLayer {
                input_layernorm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                q_proj: linear(&format!("{p}.self_attn.q_proj"), config.q_dim(), h, qkv)?,
                k_proj: linear(&format!("{p}.self_attn.k_proj"), config.kv_dim(), h, qkv)?,
                v_proj: linear(&format!("{p}.self_attn.v_proj"), config.kv_dim(), h, qkv)?,
                o_proj: linear(&format!("{p}.self_attn.o_proj"), h, config.q_dim(), o)?,
                post_attention_layernorm: vector(
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                )?,
                gate_proj: linear(&format!("{p}.mlp.gate_proj"), inter, h, mlp)?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), inter, h, mlp)?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), h, inter, mlp)?,
            });
        }
        let norm = vector("model.norm.weight", h)?;
        // Tied models reuse the embedding matrix. A config that leaves `tie_word_embeddings`
        // out means untied (HF's default), but checkpoints re-saved from tied models often
        // omit the flag as well as the tensor: without an lm_head, use the embedding (as
        // llama.cpp does without `output.weight`) rather than refuse the model.
        let lm_head = if config.tie_word_embeddings {
            None
        } else if store.contains("lm_head.weight") {
            Some(store.tensor("lm_head.weight", &[config.vocab_size, h])?)
        } else {
            tracing::warn!("no lm_head.weight: the output projection reuses the embedding matrix");
            None
        };
        Ok(ModelWeights {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The output projection: `lm_head`, or the embedding matrix when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The dtype most weights are stored in (the first layer's gate projection's; GGUF files
    /// may keep the embedding and a few matrices in other types).
    pub fn dtype(&self) -> DType {
        self.layers
            .first()
            .map_or(self.embed_tokens.dtype, |l| l.gate_proj.weight.dtype)
    }

    /// Bytes of weights read for one decode step (every matrix once).
    pub fn decode_bytes(&self) -> usize {
        let layer_bytes: usize = self
            .layers
            .iter()
            .map(|l| {
                l.linears()
                    .iter()
                    .map(|lin| lin.weight.size_bytes())
                    .sum::<usize>()
            })
            .sum();
        layer_bytes + self.lm_head().size_bytes()
    }
}
