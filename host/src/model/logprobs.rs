//! Log-probabilities from a row of raw logits: what OpenAI's `logprobs` and TGI's token
//! `logprob` / `top_tokens` / `decoder_input_details` report. Always from the model's own
//! distribution (before penalties and temperature), as vLLM and TGI report them.

use super::cpu::ops::exp_affine;
use super::draw::heaviest;
use super::sampling::{lane_sum, max_logit};

/// A generated token's log-probability and the most likely alternatives at its step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// `log(sum(exp(row)))`, computed stably (NaN entries count as -inf).
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = max_logit(row);
    if !max.is_finite() {
        return max;
    }
    // e^(l - max) vectorised a run at a time (a scalar f64 `exp` per entry took ~250 us for
    // a 49,152-token row, once per prompt token with prompt log-probabilities).
    let mut run = [0.0f32; 256];
    let mut sum = 0.0f64;
    for part in row.chunks(run.len()) {
        let weights = &mut run[..part.len()];
        exp_affine(part, 1.0, max, weights);
        sum += lane_sum(weights) as f64;
    }
    max + sum.ln() as f32
}

/// Log-probability of token `id` under `row`.
pub fn logprob_of(row: &[f32], id: u32) -> f32 {
    row.get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - log_sum_exp(row))
}

/// `id`'s log-probability and the `n` most likely tokens of `row` (NaN entries never among
/// them).
pub fn token_logprobs(
    row: &[f32],
    id: u32,
    n: usize,
    scratch: &mut Vec<(f32, u32)>,
) -> TokenLogprobs {
    let lse = log_sum_exp(row);
    let logprob = row.get(id as usize).map_or(f32::NEG_INFINITY, |&l| l - lse);
    let n = n.min(row.len());
    let mut top = Vec::with_capacity(n);
    if n > 0 {
        heaviest(row, n, &mut Vec::new(), scratch);
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if n < scratch.len() {
            scratch.select_nth_unstable_by(n - 1, order);
            scratch.truncate(n);
        }
        scratch.sort_unstable_by(order);
        top.extend(scratch.iter().map(|&(l, i)| (i, l - lse)));
    }
    TokenLogprobs { logprob, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let total: f32 = row.iter().map(|&l| (l - log_sum_exp(&row)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let lp = token_logprobs(&row, 2, 3, &mut Vec::new());
        let expected = 2.0 - (1f32.exp() + 2.0 * 3f32.exp() + 2f32.exp()).ln();
        assert!((lp.logprob - expected).abs() < 1e-5);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "most likely first, ties by id");
        assert!((logprob_of(&row, 1) - lp.top[0].1).abs() < 1e-6);
    }

    #[test]
    fn long_rows_match_f64_and_skip_nan() {
        let mut rng = crate::model::rng::Rng::new(3);
        let mut row: Vec<f32> = (0..49_999).map(|_| rng.next_signed_f32() * 12.0).collect();
        let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
        let want = max
            + row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        assert!(
            (log_sum_exp(&row) as f64 - want).abs() < 2e-5,
            "{}",
            log_sum_exp(&row)
        );
        // The top 5 by a full sort, NaN left out.
        row[17] = f32::NAN;
        row[40_000] = 100.0;
        let lp = token_logprobs(&row, 40_000, 5, &mut Vec::new());
        let mut sorted: Vec<(f32, u32)> = row
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (l, i as u32))
            .collect();
        sorted.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        let want: Vec<u32> = sorted[..5].iter().map(|t| t.1).collect();
        assert_eq!(ids, want);
        assert!(lp.logprob > -1e-3 && lp.logprob <= 0.0, "{}", lp.logprob);
    }

    #[test]
    fn zero_alternatives_and_large_logits() {
        let row = [1000.0f32, 999.0];
        let lp = token_logprobs(&row, 0, 0, &mut Vec::new());
        assert!(lp.top.is_empty());
        // f32 resolves about 1e-4 at a magnitude of 1000.
        assert!((lp.logprob - (-(1.0 + (-1f32).exp()).ln())).abs() < 1e-3);
        assert_eq!(logprob_of(&row, 7), f32::NEG_INFINITY);
    }
}
