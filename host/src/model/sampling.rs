//! Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p,
//! after the optional penalties (HF order: repetition penalty, temperature, top-k, top-p; then
//! OpenAI's presence and frequency penalties, applied with the repetition penalty).

use super::draw::Draw;
use super::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Sample (true) or take the most likely token (false).
    pub do_sample: bool,
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1.0 keeps all.
    pub top_p: f32,
    /// HF repetition penalty over prompt and generated tokens; 1.0 is none.
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty: subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: no sampling, or a temperature of zero.
    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature <= 0.0
    }
}

/// Per-sequence sampling state: the RNG and which tokens have been seen.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Tokens seen in prompt or output (each penalised once, as HF does).
    seen: Vec<bool>,
    /// How often each token was generated (for presence / frequency penalties), by id.
    generated_counts: Vec<u32>,
    /// The distinct generated tokens, so penalties touch only those.
    generated: Vec<u32>,
    draw: Draw,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab_size: usize) -> Self {
        Sampler {
            rng: Rng::new(params.seed),
            seen: if params.repetition_penalty != 1.0 {
                vec![false; vocab_size]
            } else {
                Vec::new()
            },
            generated_counts: if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
                vec![0; vocab_size]
            } else {
                Vec::new()
            },
            generated: Vec::new(),
            params,
            draw: Draw::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether [`Sampler::sample`] picks the argmax of the row as the model gives it: greedy,
    /// and no penalty to change the row first.
    pub fn takes_plain_argmax(&self) -> bool {
        let p = &self.params;
        p.is_greedy()
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
    }

    /// Records a prompt or generated token for the repetition penalty.
    pub fn observe(&mut self, token: u32) {
        if let Some(seen) = self.seen.get_mut(token as usize) {
            *seen = true;
        }
    }

    /// Records a generated token: seen (repetition penalty) and counted (presence / frequency).
    pub fn observe_generated(&mut self, token: u32) {
        self.observe(token);
        if let Some(count) = self.generated_counts.get_mut(token as usize) {
            if *count == 0 {
                self.generated.push(token);
            }
            *count += 1;
        }
    }

    /// Picks the next token; `logits` may be modified.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_repetition_penalty(logits);
        self.apply_presence_frequency(logits);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let p = &self.params;
        self.draw
            .draw(logits, p.temperature, p.top_k, p.top_p, &mut self.rng)
    }

    fn apply_presence_frequency(&self, logits: &mut [f32]) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        for &token in &self.generated {
            let count = self.generated_counts[token as usize];
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= presence + frequency * count as f32;
            }
        }
    }

    fn apply_repetition_penalty(&self, logits: &mut [f32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 {
            return;
        }
        for (logit, _) in logits.iter_mut().zip(&self.seen).filter(|(_, &s)| s) {
            *logit = if *logit > 0.0 {
                *logit / penalty
            } else {
                *logit * penalty
            };
        }
    }
}

/// Index of the largest logit, the lowest one on ties (as `torch.argmax`); NaN never wins, and
/// a row with nothing above -inf gives 0. The GPU's `argmax_rows` picks the same.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_logit(logits);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    // Runs of 64 tested whole (vectorised) before the one that holds the maximum is searched:
    // a plain search is a serial chain of compares and branches, 5x slower.
    for (r, run) in logits.chunks(64).enumerate() {
        if run.iter().fold(false, |found, &l| found | (l == max)) {
            let at = run.iter().position(|&l| l == max).unwrap_or(0);
            return (r * 64 + at) as u32;
        }
    }
    0
}

/// The sum of `values` in f32, sixteen running sums at a time (vectorised; one running sum
/// is a serial chain).
pub(super) fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let whole = values.chunks_exact(16);
    let tail: f32 = whole.remainder().iter().sum();
    for chunk in whole {
        for (acc, v) in lanes.iter_mut().zip(chunk) {
            *acc += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The largest logit, ignoring NaN; -inf for a row without any other.
pub(super) fn max_logit(logits: &[f32]) -> f32 {
    // Sixteen running maxima, one per lane, so the compiler vectorises the loop: one running
    // maximum is a serial chain (49,152 logits: 26 us against 2).
    let mut lanes = [f32::NEG_INFINITY; 16];
    let whole = logits.chunks_exact(16);
    let mut max = f32::NEG_INFINITY;
    for &l in whole.remainder() {
        if l > max {
            max = l;
        }
    }
    for chunk in whole {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            if l > *m {
                *m = l;
            }
        }
    }
    for &m in &lanes {
        if m > max {
            max = m;
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(seed: u64) -> SamplingParams {
        SamplingParams {
            do_sample: true,
            temperature: 1.0,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn presence_and_frequency_penalties_follow_openai() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params, 3);
        s.observe(0); // a prompt token: not penalised by these two
        s.observe_generated(1);
        s.observe_generated(1);
        s.observe_generated(2);
        let mut logits = [1.0, 2.0, 1.5];
        s.apply_presence_frequency(&mut logits);
        assert_eq!(logits, [1.0, 2.0 - 0.5 - 0.5, 1.5 - 0.5 - 0.25]);
        // Greedy now prefers token 0, whose logit was untouched.
        assert_eq!(s.sample(&mut [1.0, 2.0, 1.5]), 0);
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::default(), 4);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        let mut row: Vec<f32> = (0..1000).map(|i| (i % 37) as f32).collect();
        assert_eq!(argmax(&row), 36);
        row[700] = 50.0;
        row[999] = 50.0;
        assert_eq!(argmax(&row), 700);
        row[3] = f32::NAN;
        row[998] = f32::NAN;
        assert_eq!(argmax(&row), 700);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[f32::NAN; 5]), 0);
        assert_eq!(argmax(&[1.0, f32::INFINITY, f32::INFINITY]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn same_seed_same_samples() {
        let logits = [1.0, 1.1, 0.9, 1.05, 0.5];
        let draw = |seed| {
            let mut s = Sampler::new(sampling(seed), 5);
            (0..50)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 1,
                ..sampling(3)
            },
            4,
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 1.2, 1.1, 0.0]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two.
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.7,
                ..sampling(11)
            },
            4,
        );
        for _ in 0..200 {
            let t = s.sample(&mut [3.0, 2.0, 1.0, 0.0]);
            assert!(t < 2, "token {t} is outside the nucleus");
        }
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params, 3);
        s.observe(0);
        // 2.0 / 2 = 1.0 < 1.5: the seen token loses.
        assert_eq!(s.sample(&mut [2.0, 1.5, -1.0]), 1);
    }

    #[test]
    fn low_temperature_concentrates() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.01,
                ..sampling(5)
            },
            3,
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [1.0, 1.5, 0.5]), 1);
        }
    }
}
