//! A GGUF file's tensors under the Hugging Face names the executor asks for.

use super::header::TensorInfo;
use crate::model::error::{ModelError, Result};
use crate::model::weights::{Tensor, TensorSource};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub struct GgufStore {
    pub(super) path: PathBuf,
    pub(super) map: Arc<Mmap>,
    pub(super) tensors: BTreeMap<String, TensorInfo>,
    /// `(query heads, key/value heads)` when q/k rows are in llama.cpp's rotary layout.
    pub(super) permuted_heads: Option<(usize, usize)>,
}

/// The GGUF name of a Hugging Face tensor name (llama.cpp's naming).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Row order that undoes llama.cpp's q/k permutation for `heads` heads of `head_dim` rows:
/// the converter stores Hugging Face's row `h·d + j·d/2 + i` (rotary half `j`, pair `i`) at
/// `h·d + 2i + j`, so that rotary pairs sit next to each other.
pub fn unpermute_rows(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut from = Vec::with_capacity(heads * head_dim);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                from.push(h * head_dim + 2 * i + j);
            }
        }
    }
    from
}

impl GgufStore {
    fn error(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            message,
        }
    }

    /// The tensor stored under its GGUF name, unchanged.
    pub(super) fn raw(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).map(|info| self.open(info))
    }

    fn open(&self, info: &TensorInfo) -> Tensor {
        Tensor::mapped(
            &self.map,
            info.range.clone(),
            info.dtype,
            info.shape.clone(),
        )
    }
}

impl TensorSource for GgufStore {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.tensors.contains_key(&g))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let gguf =
            gguf_name(name).ok_or_else(|| self.error(format!("no GGUF name for tensor {name}")))?;
        let info = self
            .tensors
            .get(&gguf)
            .ok_or_else(|| self.error(format!("missing tensor {gguf}")))?;
        if info.shape != shape {
            return Err(ModelError::WrongShape {
                path: self.path.clone(),
                tensor: gguf,
                actual: info.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let tensor = self.open(info);
        let heads = match (self.permuted_heads, name) {
            (Some((q, _)), n) if n.contains(".self_attn.q_proj.") => Some(q),
            (Some((_, kv)), n) if n.contains(".self_attn.k_proj.") => Some(kv),
            _ => None,
        };
        Ok(match heads {
            Some(heads)
                if heads > 0
                    && shape[0].is_multiple_of(heads)
                    && (shape[0] / heads).is_multiple_of(2) =>
            {
                tensor.with_rows_permuted(&unpermute_rows(heads, shape[0] / heads))
            }
            Some(_) => {
                return Err(self.error(format!(
                    "tensor {gguf}: {} rows do not split into {heads:?} heads of even size",
                    shape[0]
                )))
            }
            None => tensor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_onto_llama_cpp_names() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
            ),
            (
                "model.layers.11.self_attn.q_proj.bias",
                "blk.11.attn_q.bias",
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                "blk.3.attn_output.weight",
            ),
            (
                "model.layers.2.mlp.down_proj.weight",
                "blk.2.ffn_down.weight",
            ),
            (
                "model.layers.2.post_attention_layernorm.weight",
                "blk.2.ffn_norm.weight",
            ),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        for (hf, gguf) in cases {
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf), "{hf}");
        }
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mlp.experts.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // llama.cpp's converter: reshape(heads, 2, d/2, cols), swap axes 1 and 2.
        let (heads, d) = (3, 8);
        let permuted: Vec<usize> = (0..heads)
            .flat_map(|h| (0..d / 2).flat_map(move |i| (0..2).map(move |j| h * d + j * d / 2 + i)))
            .collect();
        // permuted[g] = the HF row stored at GGUF row g.
        let from = unpermute_rows(heads, d);
        let restored: Vec<usize> = from.iter().map(|&g| permuted[g]).collect();
        assert_eq!(restored, (0..heads * d).collect::<Vec<_>>());
    }
}
