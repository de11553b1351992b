//! Drawing a token at random from a row of logits, at a temperature, from the whole
//! vocabulary, its `top_k` most likely tokens, or its `top_p` nucleus, without sorting the
//! whole vocabulary (sorting a 49,152-token row took ~1 ms, a sixth of a SmolLM2 decode step
//! on two cores):
//!
//! - whole vocabulary: each token's weight `e^(l/T − max)` (vectorised), a partial sum per run
//!   of [`RUN`] tokens, then a walk in id order that skips whole runs;
//! - `top_k`: the runs of 64 logits whose maximum is among the `k` largest maxima hold the
//!   `k` largest logits; only those runs are searched, and the `k` selected (no sort);
//! - `top_p`: the same search finds the 256 heaviest tokens, which usually hold the nucleus;
//!   they are sorted, and only when their mass falls short of `top_p` (a flat distribution)
//!   are all tokens searched, sorting eight times as many candidates each round.
//!
//! Which token a given random number picks is not that of a walk in sorted order, but each
//! token is drawn with its probability under the softmax of the kept tokens.

use super::cpu::ops::exp_affine;
use super::rng::Rng;
use super::sampling::{argmax, lane_sum, max_logit};

/// Tokens per partial sum of the weights.
const RUN: usize = 256;

/// Candidates sorted first when looking for the nucleus.
const FIRST_NUCLEUS: usize = 256;

/// Scratch space kept between draws of one sequence.
#[derive(Default)]
pub struct Draw {
    weights: Vec<f32>,
    run_sums: Vec<f64>,
    maxima: Vec<f32>,
    candidates: Vec<(f32, u32)>,
}

impl Draw {
    /// A token from `logits` (one row of the vocabulary), drawn with `rng`. `temperature`
    /// must be above 0; `top_k` 0 or at least the row's length keeps every token; `top_p`
    /// at least 1 keeps every token. NaN logits are never drawn.
    pub fn draw(
        &mut self,
        logits: &[f32],
        temperature: f32,
        top_k: usize,
        top_p: f32,
        rng: &mut Rng,
    ) -> u32 {
        let inv_t = 1.0 / temperature;
        let shift = max_logit(logits) * inv_t;
        if !shift.is_finite() {
            // Every logit -inf or NaN, or one so large (or the temperature so low) that the
            // scaled maximum overflows: the largest logit is certain.
            return argmax(logits);
        }
        let c = &mut self.candidates;
        if top_k > 0 && top_k < logits.len() {
            heaviest(logits, top_k, &mut self.maxima, c);
            if top_k < c.len() {
                c.select_nth_unstable_by(top_k - 1, heavier);
                c.truncate(top_k);
            }
            for cand in c.iter_mut() {
                let a = cand.0 * inv_t - shift;
                cand.0 = if a >= -104.0 { a.exp() } else { 0.0 };
            }
            if top_p < 1.0 {
                let total = c.iter().map(|cand| cand.0 as f64).sum();
                let keep = nucleus(c, total, top_p as f64);
                c.truncate(keep);
            }
            return walk(c, rng);
        }
        self.weights.resize(logits.len(), 0.0);
        exp_affine(logits, inv_t, shift, &mut self.weights);
        run_sums(&self.weights, &mut self.run_sums);
        let total: f64 = self.run_sums.iter().sum();
        if top_p >= 1.0 {
            return walk_runs(&self.weights, &self.run_sums, rng.next_f64() * total);
        }
        // The nucleus is usually among the few heaviest tokens; when they fall short (a flat
        // distribution), it is looked for among all of them. Searched by logit, not weight:
        // at a low temperature most weights underflow to 0, and a search among equal zeros
        // would take them all.
        heaviest(logits, FIRST_NUCLEUS, &mut self.maxima, c);
        for cand in c.iter_mut() {
            cand.0 = self.weights[cand.1 as usize];
        }
        let mass: f64 = c.iter().map(|cand| cand.0 as f64).sum();
        if mass / total < top_p as f64 {
            c.clear();
            c.extend(
                self.weights
                    .iter()
                    .enumerate()
                    .filter(|(_, &w)| w > 0.0)
                    .map(|(i, &w)| (w, i as u32)),
            );
        }
        let keep = nucleus(c, total, top_p as f64);
        c.truncate(keep);
        walk(c, rng)
    }
}

/// Heaviest first (for sorts and selections of `(value, id)`).
fn heavier(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0)
}

/// Sets `out` to the `(value, id)` of every value of `values` at least as large as the
/// `k`-th largest maximum of its runs of 64: the `k` largest values and usually few others
/// (every non-NaN value when there are fewer than `k` runs). Only the runs whose maximum
/// reaches that are read again.
pub(super) fn heaviest(values: &[f32], k: usize, maxima: &mut Vec<f32>, out: &mut Vec<(f32, u32)>) {
    const RUN_K: usize = 64;
    out.clear();
    maxima.clear();
    maxima.extend(values.chunks(RUN_K).map(max_logit));
    let threshold = if k <= maxima.len() {
        // On a copy at the end of `maxima`, which the selection reorders.
        let runs = maxima.len();
        maxima.extend_from_within(..runs);
        let (_, kth, _) = maxima[runs..].select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        maxima.truncate(runs);
        kth
    } else {
        f32::NEG_INFINITY
    };
    for (r, (run, &max)) in values.chunks(RUN_K).zip(maxima.iter()).enumerate() {
        if max >= threshold {
            let first = r * RUN_K;
            out.extend(
                run.iter()
                    .enumerate()
                    .filter(|(_, &v)| v >= threshold)
                    .map(|(i, &v)| (v, (first + i) as u32)),
            );
        }
    }
}

/// Draws from `(weight, id)` candidates in proportion to their weights.
fn walk(c: &[(f32, u32)], rng: &mut Rng) -> u32 {
    let total: f64 = c.iter().map(|cand| cand.0 as f64).sum();
    let mut target = rng.next_f64() * total;
    for cand in c {
        target -= cand.0 as f64;
        if target < 0.0 {
            return cand.1;
        }
    }
    // Rounding left a sliver past the last candidate: the last one with any weight.
    c.iter()
        .rev()
        .find(|cand| cand.0 > 0.0)
        .map_or(0, |cand| cand.1)
}

/// Sorts the heaviest candidates first and returns how many make the nucleus: the fewest
/// whose weights reach `top_p` of `total` (all of them if rounding keeps the sum short).
/// Only the candidates up to there, and at most eight times as many, are sorted.
pub fn nucleus(c: &mut [(f32, u32)], total: f64, top_p: f64) -> usize {
    let (mut sorted, mut cumulative, mut end) = (0, 0.0f64, FIRST_NUCLEUS);
    while sorted < c.len() {
        let end_now = end.min(c.len());
        if end_now < c.len() {
            // Everything before `sorted` outweighs what is left; bring the next heaviest
            // `end_now - sorted` of the rest forward.
            c[sorted..].select_nth_unstable_by(end_now - sorted - 1, heavier);
        }
        c[sorted..end_now].sort_unstable_by(heavier);
        for (i, cand) in c[sorted..end_now].iter().enumerate() {
            cumulative += cand.0 as f64 / total;
            if cumulative >= top_p {
                return sorted + i + 1;
            }
        }
        sorted = end_now;
        end = end.saturating_mul(8);
    }
    c.len()
}

/// `sums[r]`: the sum of `weights` over run `r` of [`RUN`] tokens.
fn run_sums(weights: &[f32], sums: &mut Vec<f64>) {
    sums.clear();
    sums.extend(weights.chunks(RUN).map(|run| lane_sum(run) as f64));
}

/// The token at which the running sum of `weights`, in id order, passes `target`.
fn walk_runs(weights: &[f32], sums: &[f64], mut target: f64) -> u32 {
    for (r, &sum) in sums.iter().enumerate() {
        if target < sum {
            let start = r * RUN;
            let run = &weights[start..(start + RUN).min(weights.len())];
            for (i, &w) in run.iter().enumerate() {
                target -= w as f64;
                if target < 0.0 {
                    return (start + i) as u32;
                }
            }
            // The run's f32 sum rounded above its tokens' f64 one: its last token with weight.
            return last_weighted(run).map_or(0, |i| (start + i) as u32);
        }
        target -= sum;
    }
    last_weighted(weights).map_or(0, |i| i as u32)
}

fn last_weighted(weights: &[f32]) -> Option<usize> {
    weights.iter().rposition(|&w| w > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative frequencies of `draws` draws.
    fn frequencies(
        logits: &[f32],
        temperature: f32,
        top_k: usize,
        top_p: f32,
        draws: usize,
    ) -> Vec<f64> {
        let (mut d, mut rng) = (Draw::default(), Rng::new(99));
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[d.draw(logits, temperature, top_k, top_p, &mut rng) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    /// The softmax of `logits / temperature` over the ids in `kept`, zero elsewhere.
    fn softmax_over(logits: &[f32], temperature: f32, kept: &[usize]) -> Vec<f64> {
        let mut p = vec![0.0f64; logits.len()];
        let max = kept
            .iter()
            .map(|&i| logits[i] as f64)
            .fold(f64::MIN, f64::max);
        for &i in kept {
            p[i] = ((logits[i] as f64 - max) / temperature as f64).exp();
        }
        let total: f64 = p.iter().sum();
        p.iter().map(|v| v / total).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tolerance: f64) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance,
                "token {i}: drawn {g:.4}, probability {w:.4}"
            );
        }
    }

    /// A row longer than one run, so the walk crosses runs.
    fn long_row() -> Vec<f32> {
        let mut rng = Rng::new(5);
        (0..700).map(|_| rng.next_signed_f32() * 3.0).collect()
    }

    #[test]
    fn whole_vocabulary_draws_follow_the_softmax() {
        let logits = [1.0, 2.0, 0.5, 3.0, -1.0, f32::NEG_INFINITY];
        for t in [1.0, 0.5, 2.0] {
            let want = softmax_over(&logits, t, &[0, 1, 2, 3, 4]);
            assert_close(&frequencies(&logits, t, 0, 1.0, 40_000), &want, 0.01);
        }
        // Across runs: the mass of each run of 100 ids.
        let logits = long_row();
        let got = frequencies(&logits, 1.0, 0, 1.0, 40_000);
        let want = softmax_over(&logits, 1.0, &(0..700).collect::<Vec<_>>());
        let per = |p: &[f64]| p.chunks(100).map(|c| c.iter().sum()).collect::<Vec<f64>>();
        assert_close(&per(&got), &per(&want), 0.01);
    }

    #[test]
    fn top_k_and_top_p_draw_from_what_they_keep() {
        let logits = [1.0, 2.0, 0.5, 3.0, -1.0, 2.5];
        // top_k 3: ids 3, 5, 1.
        let want = softmax_over(&logits, 1.0, &[3, 5, 1]);
        assert_close(&frequencies(&logits, 1.0, 3, 1.0, 40_000), &want, 0.01);
        // Probabilities ~[.06 .17 .04 .45 .01 .27]: top_p 0.6 keeps 3 and 5.
        let want = softmax_over(&logits, 1.0, &[3, 5]);
        assert_close(&frequencies(&logits, 1.0, 0, 0.6, 40_000), &want, 0.01);
        // Both: top_k first (3, 5, 1: ~[.51 .31 .19]), then their nucleus: 3 and 5.
        assert_close(&frequencies(&logits, 1.0, 3, 0.6, 40_000), &want, 0.01);
    }

    /// The ids of the fewest heaviest tokens whose softmax mass reaches `top_p`.
    fn nucleus_by_sort(logits: &[f32], top_p: f64) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let mut w: Vec<(f64, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (((l - max) as f64).exp(), i as u32))
            .collect();
        w.sort_by(|a, b| b.0.total_cmp(&a.0));
        let total: f64 = w.iter().map(|x| x.0).sum();
        let mut cumulative = 0.0;
        let keep = w
            .iter()
            .position(|x| {
                cumulative += x.0 / total;
                cumulative >= top_p
            })
            .map_or(w.len(), |i| i + 1);
        w[..keep].iter().map(|x| x.1).collect()
    }

    #[test]
    fn large_rows_keep_what_a_full_sort_keeps() {
        let mut rng = Rng::new(23);
        let mut d = Draw::default();
        // A flat row (the nucleus is most of it), a peaked one (a few tokens), one between.
        for spread in [0.5f32, 4.0, 40.0] {
            let logits: Vec<f32> = (0..20_000)
                .map(|_| rng.next_signed_f32() * spread)
                .collect();
            for top_p in [0.3f32, 0.9] {
                let kept = nucleus_by_sort(&logits, top_p as f64);
                let mut inside = vec![false; logits.len()];
                for &i in &kept {
                    inside[i as usize] = true;
                }
                let mut seen = std::collections::HashSet::new();
                for _ in 0..1000 {
                    let t = d.draw(&logits, 1.0, 0, top_p, &mut rng);
                    assert!(
                        inside[t as usize],
                        "spread {spread} top_p {top_p}: {t} outside"
                    );
                    seen.insert(t);
                }
                // Draws spread over the nucleus, not stuck on part of it.
                assert!(
                    seen.len() >= kept.len().min(1000) / 2,
                    "{} of {}",
                    seen.len(),
                    kept.len()
                );
            }
            for top_k in [1usize, 40, 3000] {
                let mut order: Vec<u32> = (0..logits.len() as u32).collect();
                order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
                let mut inside = vec![false; logits.len()];
                for &i in &order[..top_k] {
                    inside[i as usize] = true;
                }
                for _ in 0..1000 {
                    let t = d.draw(&logits, 1.0, top_k, 1.0, &mut rng);
                    assert!(
                        inside[t as usize],
                        "spread {spread} top_k {top_k}: {t} outside"
                    );
                }
            }
        }
    }

    #[test]
    fn nucleus_matches_a_full_sort() {
        let mut rng = Rng::new(17);
        for (len, spread) in [(5000, 1.0f32), (5000, 30.0), (300, 5.0), (70_000, 8.0)] {
            let weights: Vec<f32> = (0..len)
                .map(|_| (rng.next_signed_f32() * spread).exp())
                .collect();
            let total: f64 = weights.iter().map(|&w| w as f64).sum();
            for top_p in [0.01, 0.5, 0.9, 0.999, 1.0] {
                let mut c: Vec<(f32, u32)> = weights
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| (w, i as u32))
                    .collect();
                let keep = nucleus(&mut c, total, top_p);
                let mut sorted = weights.clone();
                sorted.sort_unstable_by(|a, b| b.total_cmp(a));
                let mut cumulative = 0.0;
                let want = sorted
                    .iter()
                    .position(|&w| {
                        cumulative += w as f64 / total;
                        cumulative >= top_p
                    })
                    .map_or(len, |i| i + 1);
                assert_eq!(keep, want, "len {len} spread {spread} top_p {top_p}");
                let kept: Vec<f32> = c[..keep].iter().map(|cand| cand.0).collect();
                assert_eq!(kept, sorted[..keep], "the nucleus, heaviest first");
            }
        }
    }

    #[test]
    fn odd_rows_draw_something_sensible() {
        let mut d = Draw::default();
        let mut rng = Rng::new(1);
        let nan = f32::NAN;
        for _ in 0..200 {
            // NaN logits never drawn.
            let t = d.draw(&[nan, 1.0, nan, 1.0], 1.0, 0, 1.0, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
            let t = d.draw(&[nan, 1.0, nan, 1.0], 1.0, 0, 0.5, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
            let t = d.draw(&[nan, 1.0, nan, 1.0, 0.0], 1.0, 2, 1.0, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }
        // Nothing finite: the argmax's answer, 0.
        let all_low = [f32::NEG_INFINITY; 3];
        assert_eq!(d.draw(&all_low, 1.0, 0, 1.0, &mut rng), 0);
        // An infinite logit, or a temperature so low the scaled maximum overflows: certain.
        assert_eq!(d.draw(&[1.0, f32::INFINITY, 2.0], 1.0, 0, 1.0, &mut rng), 1);
        assert_eq!(d.draw(&[1.0, 3.0, 2.0], 1e-38, 0, 0.9, &mut rng), 1);
        // A very low temperature that does not overflow: still the maximum.
        for _ in 0..50 {
            assert_eq!(d.draw(&[1.0, 1.5, 0.5], 1e-3, 0, 1.0, &mut rng), 1);
        }
    }
}
