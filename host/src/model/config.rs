//! `config.json` of a Hugging Face Llama-family model, validated into [`ModelConfig`].

use super::error::{read_json, ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// The architectures this executor implements; they differ only in which biases exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise frequency rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Each frequency divided by its own factor (`head_dim / 2` of them), as GGUF files of
    /// llama 3.1-style models store the scaling (`rope_freqs.weight`).
    FreqFactors(Vec<f32>),
    /// YaRN (transformers' `_compute_yarn_parameters`): the low frequencies divided by
    /// `factor`, the high ones kept, a linear ramp between the dimensions that turn
    /// `beta_fast` and `beta_slow` times over `original_max_position_embeddings`; cos and sin
    /// multiplied by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        /// Round the ramp's ends outwards to whole dimensions.
        truncate: bool,
        attention_factor: f64,
    },
}

/// Everything the executor needs to know about the model's shape.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (qwen2 always; llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (llama with `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down projections carry biases (llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Attend only to the last `sliding_window` positions, when set.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A token id field that may be a number, a list of numbers or null.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub(crate) enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub(crate) fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Rope parameters as found in `rope_scaling` (transformers 4) or `rope_parameters` (5).
#[derive(Deserialize, Debug, Default)]
struct RawRope {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    // YaRN's.
    attention_factor: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    truncate: Option<bool>,
}

#[derive(Deserialize, Debug)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
}

impl ModelConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawConfig = read_json(path)?;
        Self::from_raw(raw, path)
    }

    /// Parses and validates config text; `path` only names the source in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self> {
        let invalid = |message: String| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            message,
        };
        let model_type = raw
            .model_type
            .clone()
            .ok_or_else(|| invalid("model_type is missing".into()))?;
        let architecture = match model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(ModelError::UnsupportedModelType {
                    path: path.to_path_buf(),
                    model_type,
                })
            }
        };
        let required = |value: Option<usize>, name: &str| -> Result<usize> {
            match value {
                Some(v) if v > 0 => Ok(v),
                Some(_) => Err(invalid(format!("{name} must be positive"))),
                None => Err(invalid(format!("{name} is missing"))),
            }
        };
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let intermediate_size = required(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        let num_key_value_heads = required(
            raw.num_key_value_heads.or(Some(num_attention_heads)),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => required(Some(d), "head_dim")?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(invalid(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}) and head_dim is not given"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(format!(
                "head_dim ({head_dim}) must be even for rotary embeddings"
            )));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(invalid(format!(
                    "hidden_act {act:?} is not supported (only silu)"
                )));
            }
        }
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(invalid(format!(
                "rope_theta ({rope_theta}) must be positive"
            )));
        }
        // Optional sizes still have to be usable when given: a context of 0 positions (or,
        // below, a window of 0) would load and then fail on the first request.
        let mut max_position_embeddings = required(
            raw.max_position_embeddings.or(Some(2048)),
            "max_position_embeddings",
        )?;
        let rope_scaling = parse_rope_scaling(
            raw.rope_scaling.as_ref().or(rope),
            max_position_embeddings,
            &invalid,
        )?;
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(invalid(format!(
                "rms_norm_eps ({rms_norm_eps}) must be positive"
            )));
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        // transformers' Llama has no sliding window (a `sliding_window` key in a llama config
        // does nothing there); Qwen2 uses one only with `use_sliding_window`, and only in its
        // layers from `max_window_layers` (default 28) on.
        let mut sliding_window = match architecture {
            Architecture::Llama => None,
            Architecture::Qwen2 if raw.use_sliding_window != Some(true) => None,
            _ => raw.sliding_window,
        };
        if sliding_window == Some(0) {
            return Err(invalid("sliding_window must be positive".into()));
        }
        if let (Architecture::Qwen2, Some(window)) = (architecture, sliding_window) {
            let full_layers = raw.max_window_layers.unwrap_or(28);
            if full_layers >= num_hidden_layers {
                sliding_window = None;
            } else if full_layers > 0 {
                // Some layers slide and some do not, which one window for every layer cannot
                // express; within `window` positions both are the same, so the context is cut
                // to that.
                sliding_window = None;
                if window < max_position_embeddings {
                    tracing::warn!(
                        window,
                        full_layers,
                        "layers from max_window_layers on use a sliding window: the context is \
                         cut to the window ({window} positions), where every layer sees the same"
                    );
                    max_position_embeddings = window;
                }
            }
        }
        Ok(ModelConfig {
            architecture,
            model_type,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: raw
                .bos_token_id
                .and_then(|ids| ids.to_vec().first().copied()),
            eos_token_ids: raw.eos_token_id.map(|ids| ids.to_vec()).unwrap_or_default(),
        })
    }

    /// Rows of the fused q projection output: all query heads.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of one k or v projection output: all key/value heads.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

fn parse_rope_scaling(
    rope: Option<&RawRope>,
    max_position_embeddings: usize,
    invalid: &dyn Fn(String) -> ModelError,
) -> Result<RopeScaling> {
    let Some(rope) = rope else {
        return Ok(RopeScaling::None);
    };
    let kind = rope
        .rope_type
        .as_deref()
        .or(rope.legacy_type.as_deref())
        .unwrap_or("default");
    let positive = |name: &str, value: Option<f64>| -> Result<f64> {
        match value {
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            Some(v) => Err(invalid(format!(
                "rope scaling {name} ({v}) must be positive"
            ))),
            None => Err(invalid(format!("rope scaling of type {kind} needs {name}"))),
        }
    };
    match kind {
        // Dynamic NTK scaling changes the frequencies only for sequences longer than
        // `max_position_embeddings` (transformers' `dynamic_rope_update`), which is the
        // longest context served: within it, it is the default.
        "default" | "dynamic" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: positive("factor", rope.factor)?,
        }),
        "llama3" => {
            let low = positive("low_freq_factor", rope.low_freq_factor)?;
            let high = positive("high_freq_factor", rope.high_freq_factor)?;
            if high <= low {
                return Err(invalid(format!(
                    "rope scaling high_freq_factor ({high}) must exceed low_freq_factor ({low})"
                )));
            }
            Ok(RopeScaling::Llama3 {
                factor: positive("factor", rope.factor)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: positive(
                    "original_max_position_embeddings",
                    rope.original_max_position_embeddings,
                )?,
            })
        }
        "yarn" => {
            let factor = positive("factor", rope.factor)?;
            // transformers' `get_mscale`.
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (rope.attention_factor, rope.mscale, rope.mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            };
            if !(attention_factor.is_finite() && attention_factor > 0.0) {
                return Err(invalid(format!(
                    "rope scaling attention_factor ({attention_factor}) must be positive"
                )));
            }
            let original = rope
                .original_max_position_embeddings
                .unwrap_or(max_position_embeddings as f64);
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: positive(
                    "original_max_position_embeddings",
                    Some(original),
                )?,
                // transformers' `get("beta_fast") or 32`: 0 means the default too.
                beta_fast: positive(
                    "beta_fast",
                    Some(rope.beta_fast.filter(|&b| b != 0.0).unwrap_or(32.0)),
                )?,
                beta_slow: positive(
                    "beta_slow",
                    Some(rope.beta_slow.filter(|&b| b != 0.0).unwrap_or(1.0)),
                )?,
                truncate: rope.truncate.unwrap_or(true),
                attention_factor,
            })
        }
        other => Err(invalid(format!(
            "rope scaling type {other:?} is not supported (default, linear, dynamic, llama3, yarn)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(text, Path::new("config.json"))
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100"#;

    #[test]
    fn defaults_and_gqa() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "num_key_value_heads": 2}}"#
        ))
        .unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_dim(), 32);
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rope_theta_from_rope_parameters() {
        let c = parse(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "rope_parameters": {{"rope_theta": 1e6, "rope_type": "default"}}}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn llama3_scaling() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn dynamic_scaling_is_the_default_within_the_context_and_llama_has_no_window() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"type": "dynamic", "factor": 2.0}},
            "sliding_window": 16}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.sliding_window, None);
        let c = parse(&format!(
            r#"{{"model_type": "mistral", {BASE}, "sliding_window": 16}}"#
        ))
        .unwrap();
        assert_eq!(c.sliding_window, Some(16));
    }

    #[test]
    fn qwen2_windows_only_layers_from_max_window_layers() {
        let qwen = |layers: usize| {
            parse(&format!(
                r#"{{"model_type": "qwen2", {BASE}, "max_position_embeddings": 2048,
                "use_sliding_window": true, "sliding_window": 16, "max_window_layers": {layers}}}"#
            ))
            .unwrap()
        };
        // BASE has two layers.
        let all = qwen(0);
        assert_eq!(
            (all.sliding_window, all.max_position_embeddings),
            (Some(16), 2048)
        );
        let none = qwen(2);
        assert_eq!(
            (none.sliding_window, none.max_position_embeddings),
            (None, 2048)
        );
        let mixed = qwen(1);
        assert_eq!(
            (mixed.sliding_window, mixed.max_position_embeddings),
            (None, 16)
        );
    }

    #[test]
    fn refuses_unknown_rope_type_and_model_type() {
        let err = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"type": "longrope", "factor": 2}}}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("longrope"), "{err}");
        let err = parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }

    #[test]
    fn refuses_zero_context_and_zero_window() {
        for (field, name) in [
            (r#""max_position_embeddings": 0"#, "max_position_embeddings"),
            (r#""sliding_window": 0"#, "sliding_window"),
        ] {
            let err =
                parse(&format!(r#"{{"model_type": "mistral", {BASE}, {field}}}"#)).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
            assert!(err.to_string().contains("must be positive"), "{err}");
        }
    }

    #[test]
    fn refuses_bad_head_layout() {
        let err = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "num_key_value_heads": 3}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }
}
