//! Rotary position embedding frequencies, as HF computes them (f32 `inv_freq`; linear, llama3
//! and YaRN scaling).

use super::config::{ModelConfig, RopeScaling};

/// Inverse frequencies for one head: `head_dim / 2` values.
pub struct Rope {
    inv_freq: Vec<f32>,
    /// What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    attention_factor: f32,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                (1.0 / base.powf(exponent as f64)) as f32
            })
            .collect();
        let mut attention_factor = 1.0;
        match &config.rope_scaling {
            RopeScaling::None => {}
            &RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: old_len,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor: scale,
            } => {
                // The dimension (of `dim`) whose frequency turns `turns` times over `old_len`.
                let correction = |turns: f64| {
                    let two_pi = 2.0 * std::f64::consts::PI;
                    dim as f64 * (old_len / (turns * two_pi)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, high) = (low.max(0.0), high.min(dim as f64 - 1.0));
                let high = if low == high { high + 0.001 } else { high };
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
                    let extrapolated = *f;
                    let interpolated = (extrapolated as f64 / factor) as f32;
                    // Low dimensions (high frequencies, ramp 0) keep their frequency.
                    *f = interpolated * ramp + extrapolated * (1.0 - ramp);
                }
                attention_factor = scale as f32;
            }
            RopeScaling::FreqFactors(factors) => {
                for (f, &factor) in inv_freq.iter_mut().zip(factors) {
                    *f /= factor;
                }
            }
            &RopeScaling::Linear { factor } => {
                for f in &mut inv_freq {
                    *f = (*f as f64 / factor) as f32;
                }
            }
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                for f in &mut inv_freq {
                    let freq = *f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                    *f = scaled as f32;
                }
            }
        }
        Rope {
            inv_freq,
            attention_factor,
        }
    }

    /// Fills `cos` and `sin` (each `head_dim / 2` long) for token position `pos`.
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = p * f;
            *c = angle.cos() * self.attention_factor;
            *s = angle.sin() * self.attention_factor;
        }
    }

    pub fn half_dim(&self) -> usize {
        self.inv_freq.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// YaRN as transformers computes it (`_compute_yarn_parameters`, evaluated in Python for
    /// this config: head_dim 64, theta 1e6, factor 4 over an original 4096 positions).
    #[test]
    fn yarn_frequencies_and_attention_factor_match_transformers() {
        let config = ModelConfig::from_json(
            r#"{"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
                "max_position_embeddings": 16384, "rope_theta": 1000000.0,
                "rope_scaling": {"type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 4096}}"#,
            Path::new("config.json"),
        )
        .expect("config");
        let rope = Rope::new(&config);
        let expected = [
            (0, 1.0),
            (5, 0.1154781984689458),
            (10, 0.00933465002514327),
            (15, 0.0005004761209693347),
            (20, 4.445698525097307e-05),
            (31, 3.84981631514873e-07),
        ];
        for (i, want) in expected {
            let got = f64::from(rope.inv_freq[i]);
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "inv_freq[{i}] = {got}, want {want}"
            );
        }
        let (mut cos, mut sin) = (vec![0.0; 32], vec![0.0; 32]);
        rope.angles(0, &mut cos, &mut sin);
        assert!(
            (f64::from(cos[0]) - 1.138629436111989).abs() < 1e-6,
            "{}",
            cos[0]
        );
        assert_eq!(sin[0], 0.0);
    }
}
