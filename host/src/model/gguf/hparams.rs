//! A GGUF file's `{arch}.*` hyperparameters as a [`ModelConfig`], validated by the same code
//! as a `config.json`.

use super::header::TensorInfo;
use super::metadata::Metadata;
use crate::model::config::{ModelConfig, RopeScaling};
use std::collections::BTreeMap;
use std::path::Path;

/// Architectures whose GGUF tensors this loader maps onto the executor.
pub const ARCHITECTURES: &str = "llama, qwen2";

/// Reads the hyperparameters. Errors are plain messages naming the key; the caller adds the
/// file. `rope_freqs` is the `rope_freqs.weight` tensor widened to f32, when the file has one
/// (llama 3.1-style frequency scaling).
pub fn model_config(
    meta: &Metadata,
    tensors: &BTreeMap<String, TensorInfo>,
    rope_freqs: Option<Vec<f32>>,
    path: &Path,
) -> Result<ModelConfig, String> {
    let arch = meta
        .str("general.architecture")?
        .ok_or("metadata key general.architecture is missing")?;
    if !matches!(arch, "llama" | "qwen2") {
        return Err(format!(
            "unsupported architecture {arch:?} (supported: {ARCHITECTURES})"
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.required_usize(&key("embedding_length"))?;
    let heads = meta.required_usize(&key("attention.head_count"))?;
    let kv_heads = match meta.get(&key("attention.head_count_kv")) {
        Some(super::metadata::Value::Array(_)) => {
            return Err(format!(
                "metadata key {}: per-layer head counts are not supported",
                key("attention.head_count_kv")
            ))
        }
        _ => meta
            .usize(&key("attention.head_count_kv"))?
            .unwrap_or(heads),
    };
    let head_dim = meta.usize(&key("attention.key_length"))?;
    let vocab = match tensors.get("token_embd.weight") {
        Some(t) => t.shape[0],
        None => return Err("tensor token_embd.weight is missing".into()),
    };
    let mut config = serde_json::json!({
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": meta.required_usize(&key("feed_forward_length"))?,
        "num_hidden_layers": meta.required_usize(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": meta.usize(&key("context_length"))?.unwrap_or(2048),
        "rms_norm_eps": meta.f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        "rope_theta": meta.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        "tie_word_embeddings": !tensors.contains_key("output.weight"),
        "attention_bias": tensors.contains_key("blk.0.attn_q.bias"),
        "mlp_bias": tensors.contains_key("blk.0.ffn_up.bias"),
        "hidden_act": "silu",
    });
    if let Some(d) = head_dim {
        config["head_dim"] = d.into();
    }
    if let Some(id) = meta.usize("tokenizer.ggml.bos_token_id")? {
        config["bos_token_id"] = id.into();
    }
    if let Some(id) = meta.usize("tokenizer.ggml.eos_token_id")? {
        config["eos_token_id"] = id.into();
    }
    match meta.str(&key("rope.scaling.type"))? {
        None | Some("none") => {}
        Some("linear") => {
            let factor = meta.f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
            if factor != 1.0 {
                config["rope_scaling"] = serde_json::json!({"type": "linear", "factor": factor});
            }
        }
        // The keys llama.cpp's converter writes for a YaRN config (Qwen2.5's long-context
        // setting), mapped back to the config's names.
        Some("yarn") => {
            let factor = meta
                .f64(&key("rope.scaling.factor"))?
                .ok_or_else(|| format!("yarn rope scaling needs {}", key("rope.scaling.factor")))?;
            let mut scaling = serde_json::json!({"type": "yarn", "factor": factor});
            for (gguf, name) in [
                (
                    "rope.scaling.original_context_length",
                    "original_max_position_embeddings",
                ),
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
                // The converter writes a config's own attention_factor here (llama.cpp's
                // `rope.scaling.attn_factor` means something else and is not read).
                ("rope.scaling.yarn_attn_factor", "attention_factor"),
            ] {
                if let Some(value) = meta.f64(&key(gguf))? {
                    scaling[name] = value.into();
                }
            }
            config["rope_scaling"] = scaling;
        }
        Some(other) => {
            return Err(format!(
                "metadata key {}: rope scaling {other:?} is not supported (none, linear, yarn)",
                key("rope.scaling.type")
            ))
        }
    }
    let mut config = ModelConfig::from_json(&config.to_string(), path).map_err(|e| {
        // The JSON is ours: report the validation message without the synthetic source.
        match e {
            crate::model::error::ModelError::InvalidConfig { message, .. } => message,
            other => other.to_string(),
        }
    })?;
    if let Some(dims) = meta.usize(&key("rope.dimension_count"))? {
        if dims != config.head_dim {
            return Err(format!(
                "metadata key {}: rotary embedding over {dims} of {} head dimensions is not supported",
                key("rope.dimension_count"),
                config.head_dim
            ));
        }
    }
    if let Some(factors) = rope_freqs {
        if factors.len() != config.head_dim / 2 {
            return Err(format!(
                "tensor rope_freqs.weight: {} factors, expected head_dim / 2 = {}",
                factors.len(),
                config.head_dim / 2
            ));
        }
        if config.rope_scaling != RopeScaling::None {
            return Err("rope_freqs.weight together with rope scaling metadata".into());
        }
        config.rope_scaling = RopeScaling::FreqFactors(factors);
    }
    Ok(config)
}
