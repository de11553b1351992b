//! Log-probabilities from a row of raw logits: what OpenAI's `logprobs` and TGI's token
//! `logprob` / `top_tokens` / `decoder_input_details` report. Always from the model's own
//! distribution (before penalties and temperature), as vLLM and TGI report them.

/// A generated token's log-probability and the most likely alternatives at its step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// `log(sum(exp(row)))`, computed stably.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// Log-probability of token `id` under `row`.
pub fn logprob_of(row: &[f32], id: u32) -> f32 {
    row.get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - log_sum_exp(row))
}

/// `id`'s log-probability and the `n` most likely tokens of `row`.
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
        scratch.clear();
        scratch.extend(row.iter().enumerate().map(|(i, &l)| (l, i as u32)));
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
    fn zero_alternatives_and_large_logits() {
        let row = [1000.0f32, 999.0];
        let lp = token_logprobs(&row, 0, 0, &mut Vec::new());
        assert!(lp.top.is_empty());
        // f32 resolves about 1e-4 at a magnitude of 1000.
        assert!((lp.logprob - (-(1.0 + (-1f32).exp()).ln())).abs() < 1e-3);
        assert_eq!(logprob_of(&row, 7), f32::NEG_INFINITY);
    }
}
