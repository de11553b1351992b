//! Rotary position embedding frequencies, as HF computes them (f32 `inv_freq`, llama3 scaling).

use super::config::{ModelConfig, RopeScaling};

/// Inverse frequencies for one head: `head_dim / 2` values.
pub struct Rope {
    inv_freq: Vec<f32>,
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
        match &config.rope_scaling {
            RopeScaling::None => {}
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
        Rope { inv_freq }
    }

    /// Fills `cos` and `sin` (each `head_dim / 2` long) for token position `pos`.
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = p * f;
            *c = angle.cos();
            *s = angle.sin();
        }
    }

    pub fn half_dim(&self) -> usize {
        self.inv_freq.len()
    }
}
