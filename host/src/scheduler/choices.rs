//! Picking the next token of every sequence a pass produced logits for. Sampling a row costs
//! ~10-30 us on a 32k-50k vocabulary (more with top-p or log-probabilities), so 64 sampled
//! sequences cost over a millisecond a step, which on a GPU is a large share of the step and
//! stalls the device (the next pass needs the tokens). Each sequence samples with its own
//! RNG, so the rows are sampled on the executor's host threads at once, with the same result
//! as one after another.

use crate::model::cpu::pool::ThreadPool;
use crate::model::generation::{Choice, Generation};
use std::sync::{Mutex, PoisonError};

/// Logit elements to sample (rows x vocabulary) below which the rows are sampled on the
/// scheduler's thread alone: ~60 us of work, about what waking sleeping pool threads costs.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 17;

/// What a pass gave one sequence toward its next token.
pub enum Pick<'a> {
    /// Nothing: the sequence was not in the pass, or its prompt is not all fed yet.
    None,
    /// The executor's greedy choice and its log-probability.
    Chosen(u32, f32),
    /// A row of logits to sample from (sampling may change it).
    Row(&'a mut [f32]),
}

/// One sequence's part of the work.
struct Job<'g, 'r> {
    generation: &'g mut Generation,
    pick: Pick<'r>,
    choice: Option<Choice>,
}

impl Job<'_, '_> {
    fn run(&mut self) {
        self.choice = match &mut self.pick {
            Pick::None => None,
            Pick::Chosen(id, logprob) => Some(self.generation.chosen(*id, *logprob)),
            Pick::Row(row) => Some(self.generation.choose(row)),
        };
    }
}

/// The choice of each sequence (`None` where its pick is [`Pick::None`]), in order; rows are
/// sampled on `pool`'s threads when there are enough of them to be worth it.
pub fn choose_all<'g>(
    pool: &ThreadPool,
    generations: impl IntoIterator<Item = &'g mut Generation>,
    picks: Vec<Pick<'_>>,
) -> Vec<Option<Choice>> {
    let mut jobs: Vec<Job> = generations
        .into_iter()
        .zip(picks)
        .map(|(generation, pick)| Job {
            generation,
            pick,
            choice: None,
        })
        .collect();
    let elements: usize = jobs
        .iter()
        .map(|job| match &job.pick {
            Pick::Row(row) => row.len(),
            _ => 0,
        })
        .sum();
    if elements < PARALLEL_MIN_ELEMENTS || pool.threads() == 1 {
        jobs.iter_mut().for_each(Job::run);
    } else {
        // Each task locks only its own job: the mutexes are never contended, they only let
        // the tasks share the list.
        let jobs: Vec<Mutex<Job>> = jobs.into_iter().map(Mutex::new).collect();
        pool.run(jobs.len(), &|i| {
            jobs[i].lock().unwrap_or_else(PoisonError::into_inner).run();
        });
        return jobs
            .into_iter()
            .map(|job| {
                job.into_inner()
                    .unwrap_or_else(PoisonError::into_inner)
                    .choice
            })
            .collect();
    }
    jobs.into_iter().map(|job| job.choice).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::generation::GenerationParams;
    use crate::model::rng::Rng;
    use crate::model::sampling::SamplingParams;

    const VOCAB: usize = 32_000;

    fn generations(n: usize) -> Vec<Generation> {
        (0..n)
            .map(|i| {
                let params = GenerationParams {
                    sampling: SamplingParams {
                        do_sample: true,
                        temperature: 0.8,
                        top_p: if i % 2 == 0 { 0.9 } else { 1.0 },
                        seed: i as u64,
                        ..SamplingParams::default()
                    },
                    logprobs: (i % 3 == 0).then_some(2),
                    ..GenerationParams::default()
                };
                Generation::new(params, &[1, 2, 3], &[0], VOCAB)
            })
            .collect()
    }

    fn rows(n: usize) -> Vec<f32> {
        let mut rng = Rng::new(7);
        (0..n * VOCAB)
            .map(|_| 4.0 * rng.next_signed_f32())
            .collect()
    }

    fn picks(rows: &mut [f32]) -> Vec<Pick<'_>> {
        rows.chunks_exact_mut(VOCAB)
            .enumerate()
            .map(|(i, row)| match i % 4 {
                1 => Pick::None,
                2 => Pick::Chosen(i as u32, -0.5),
                _ => Pick::Row(row),
            })
            .collect()
    }

    fn summary(choices: &[Option<Choice>]) -> Vec<Option<(u32, Option<f32>, usize)>> {
        choices
            .iter()
            .map(|c| {
                c.as_ref().map(|c| {
                    let lp = c.logprobs.as_ref();
                    (c.id, lp.map(|l| l.logprob), lp.map_or(0, |l| l.top.len()))
                })
            })
            .collect()
    }

    #[test]
    fn many_rows_on_the_pool_choose_what_one_thread_chooses() {
        let n = 24;
        // Half the picks are rows (see `picks`).
        assert!(n / 2 * VOCAB >= PARALLEL_MIN_ELEMENTS, "takes the pool");
        let (alone, pooled) = (ThreadPool::new(1), ThreadPool::new(2));
        pooled.set_profiling(true);
        let (mut gen_a, mut gen_b) = (generations(n), generations(n));
        let (mut rows_a, mut rows_b) = (rows(n), rows(n));
        for _ in 0..3 {
            let a = choose_all(&alone, gen_a.iter_mut(), picks(&mut rows_a));
            let b = choose_all(&pooled, gen_b.iter_mut(), picks(&mut rows_b));
            assert_eq!(summary(&a), summary(&b));
            assert!(a[1].is_none() && a[0].is_some());
            assert_eq!(a[2].as_ref().map(|c| c.id), Some(2));
            // Every sequence has its own RNG: the seeds give different tokens.
            let sampled: std::collections::HashSet<u32> =
                a.iter().step_by(4).flatten().map(|c| c.id).collect();
            assert!(sampled.len() > 1, "{sampled:?}");
        }
        assert_eq!(pooled.times().runs, 3, "one pooled job a step");
    }
}
